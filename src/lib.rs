//! linkgate: an edge proxy serving magic links on customers' own domains.
//!
//! The request path: [`tls`] picks the certificate by SNI, [`proxy`] routes by Host to a
//! tenant, [`link`] validates magic links, [`session`] seals and opens session cookies,
//! [`assertion`] signs identity assertions for the upstream. [`config`] turns the TOML file
//! into one validated [`config::Config`]; [`store`] is the only code touching the database.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod assertion;
pub mod config;
pub mod dev;
pub mod dns;
pub mod domains;
pub mod gateway;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod mint;
pub mod pages;
pub mod paths;
pub mod proxy;
pub mod redirect;
pub mod revocation;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod webhooks;
