//! The relay's hook into the billing pipeline for one connection.

use tokio_tungstenite::tungstenite::Message;

use super::relay::Side;

/// Observes every data frame of one connection on its way through the relay.
#[derive(Debug)]
pub struct FrameTap {
    charge_box_id: String,
}

impl FrameTap {
    /// A tap for the connection of `charge_box_id`.
    pub fn new(charge_box_id: String) -> Self {
        FrameTap { charge_box_id }
    }

    /// Sees a frame read from `from` before it is relayed.
    pub async fn observe(&self, from: Side, message: &Message) {
        if message.is_binary() {
            metrics::counter!("ocpp_lago_bridge_bad_frames_total", "direction" => from.direction(), "reason" => "binary").increment(1);
            tracing::warn!(charge_box_id = %self.charge_box_id, direction = from.direction(), bytes = message.len(), "binary frame relayed: OCPP-J is text only");
        }
    }
}
