//! The two ends of a relayed connection, named by the relay and by the tap beside it; it lives
//! below both so that neither imports the other for it.

/// One end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Charger,
    Upstream,
}

impl Side {
    /// Its slot in per-side arrays.
    pub(super) fn index(self) -> usize {
        self as usize
    }

    /// The direction of frames read from this side.
    pub fn direction(self) -> &'static str {
        match self {
            Side::Charger => "charger_to_upstream",
            Side::Upstream => "upstream_to_charger",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Charger => "charger",
            Side::Upstream => "upstream",
        }
    }
}
