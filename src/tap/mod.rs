//! tap stage (being built).
