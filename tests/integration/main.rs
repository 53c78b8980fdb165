//! All black-box tests, linked into one binary to keep link time down.

mod support;

mod cli;
mod metadata_source;
mod server;
