//! token-broker: a node-local daemon that holds Google credentials, turns
//! them into Google-signed OIDC ID tokens for any audience, keeps every token
//! in use fresh, and serves them over gRPC on a Unix socket.
//!
//! The flow (see ARCHITECTURE.md): [`server`] accepts a request, [`cache`] answers
//! it from memory or makes one shared fetch through the identity's
//! [`source`], and [`token`] checks what upstream returned.

pub mod attest;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod domain;
pub mod emulator;
pub mod kubernetes;
pub mod logging;
pub mod metadata_protocol;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod sink;
pub mod source;
pub mod token;

/// Generated code for the `tokenbroker.v1` wire contract.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tokenbroker.v1");
}
