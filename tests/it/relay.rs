//! Acceptance tests of issue 3: the bridge as a transparent OCPP-J relay.
