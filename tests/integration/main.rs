//! All black-box tests, linked into one binary to keep link time down.

mod support;

mod cache_engine;
mod cli;
mod key_files;
mod metadata_source;
mod server;
mod service_account;
