//! Black-box integration tests for the `linkgate` binary, written against
//! the external contract in SPEC.md (CLI, config, magic links, sessions, admin API, metrics).

mod harness;
mod infra;

mod admin;
mod browser;
mod cli;
mod confirm;
mod domains;
mod links;
mod metrics;
mod sessions;
mod tls;

mod keys;
mod webhooks;
