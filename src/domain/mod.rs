//! The checked values every layer shares: what an audience, an identity
//! name, a principal and a configuration problem are. This is the bottom
//! layer: it imports nothing from the rest of the crate, so config, sources,
//! policy, cache and servers can all agree on these rules without importing
//! each other (ARCHITECTURE.md, "Layers").

pub mod audience;
pub mod identity;
pub mod principal;
pub mod problem;

pub use audience::{validate_audience, AudienceError, MAX_AUDIENCE_LEN};
pub use identity::{validate_identity_name, SourceKind, DEFAULT_IDENTITY};
pub use principal::Principal;
pub use problem::Problem;
