//! All black-box tests, linked into one binary to keep link time down.

mod support;

mod access_control;
mod access_engine;
mod access_tokens;
mod cache_engine;
mod cli;
mod clients;
mod doors;
mod external_account;
mod faults;
mod google_libraries;
mod hostile_client;
mod impersonation;
mod key_files;
mod kubernetes;
mod layering;
mod log_output;
mod memory_bounds;
mod metadata_endpoint;
mod metadata_paths;
mod metadata_source;
mod operations;
mod pod_identity;
mod properties;
mod server;
mod service_account;
mod sinks;
mod streaming;
mod workloads;
