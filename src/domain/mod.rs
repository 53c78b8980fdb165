//! The checked values every layer shares: what an audience, an identity
//! name, a principal and a configuration problem are, how foreign text is
//! made fit for a log line ([`LogText`]), and which paths the daemon may
//! trust ([`trusted_path`]). This is the bottom layer: it imports nothing
//! from the rest of the crate, so config, sources, policy, cache and servers
//! can all agree on these rules without importing each other
//! (ARCHITECTURE.md, "Layers").

pub mod audience;
pub mod identity;
pub mod log_text;
pub mod principal;
pub mod problem;
pub mod trusted_path;
pub mod upstream_url;

pub use audience::{validate_audience, AudienceError, MAX_AUDIENCE_LEN};
pub use identity::{
    validate_identity_name, validate_requested_identity, IdentityError, SourceKind,
    DEFAULT_IDENTITY, MAX_REQUESTED_IDENTITY_LEN,
};
pub use log_text::LogText;
pub use principal::Principal;
pub use problem::Problem;
