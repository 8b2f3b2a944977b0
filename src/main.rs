//! Command line: `serve`, `check-config`, `mint`, `dev`. Wiring only.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use linkgate::config::Config;
use linkgate::metrics::Metrics;
use linkgate::mint::{LinkForm, MintRequest};

#[derive(Parser)]
#[command(
    name = "linkgate",
    version,
    about = "Edge proxy for magic links on customers' own domains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a configuration file; exit 2 listing every problem.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a magic link URL, offline.
    Mint {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sub: String,
        /// Link lifetime (default 5d).
        #[arg(long)]
        ttl: Option<String>,
        /// Extra claim, k=v (v parsed as JSON when it is JSON). Repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Host (and port) of the URL; default the tenant's first domain.
        #[arg(long)]
        host: Option<String>,
        /// Query form (`?magic_link=`) instead of the path form.
        #[arg(long)]
        query: bool,
        /// Make the link single-use.
        #[arg(long)]
        one_time: bool,
    },
    /// Run a local development gateway with an echo upstream (quick start).
    Dev,
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        for p in &e.problems {
            eprintln!("{p}");
        }
        ExitCode::from(2)
    })
}

/// mimalloc: the proxy makes many small, short-lived allocations per request (headers,
/// pingora's per-request state); under glibc's malloc they took about 12 % of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} tenants, {} domains, {} certificates)",
                    config.display(),
                    c.tenants.len(),
                    c.domains.len(),
                    c.certificates.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Mint {
            config,
            tenant,
            sub,
            ttl,
            claims,
            host,
            query,
            one_time,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ttl = match ttl.as_deref().map(linkgate::config::parse_duration) {
                None => linkgate::mint::DEFAULT_TTL,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    eprintln!("--ttl: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut claim_map = serde_json::Map::new();
            for c in &claims {
                match linkgate::mint::parse_claim_arg(c) {
                    Some((k, v)) => {
                        claim_map.insert(k, v);
                    }
                    None => {
                        eprintln!("--claim {c}: expected k=v");
                        return ExitCode::from(2);
                    }
                }
            }
            let req = MintRequest {
                tenant,
                sub,
                ttl,
                claims: claim_map,
                one_time,
                redirect: None,
                host,
                form: if query {
                    LinkForm::Query
                } else {
                    LinkForm::Path
                },
            };
            match linkgate::mint::mint(&cfg, &req, linkgate::gateway::now()) {
                Ok(m) => {
                    println!("{}", m.url);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mint: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve { config } => {
            let metrics = Arc::new(Metrics::new());
            linkgate::logging::init(Some(metrics.clone()));
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run(cfg, metrics, Vec::new())
        }
        Command::Dev => {
            let metrics = Arc::new(Metrics::new());
            linkgate::logging::init(Some(metrics.clone()));
            match linkgate::dev::prepare() {
                Ok((cfg, echo)) => run(cfg, metrics, vec![Box::new(echo)]),
                Err(e) => {
                    eprintln!("dev: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(
    cfg: Config,
    metrics: Arc<Metrics>,
    extra: Vec<Box<dyn pingora::services::ServiceWithDependents>>,
) -> ExitCode {
    match linkgate::server::serve(cfg, metrics, extra) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "linkgate cannot start");
            eprintln!("linkgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
