//! `linkgate serve`: builds the shared state from a validated [`Config`], then runs the
//! HTTPS proxy, the HTTP listener, the admin listener and the background tasks on pingora.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use dashmap::DashMap;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApi;
use crate::assertion::AssertionSigner;
use crate::config::{Config, StoreUrl};
use crate::domains::DomainManager;
use crate::gateway::{now, Gateway, HostMap, HostRoute, Tenant, TenantMap};
use crate::metrics::Metrics;
use crate::proxy::GatewayProxy;
use crate::redirect::HttpRedirect;
use crate::revocation::Revocations;
use crate::session::SessionSealer;
use crate::store::{SqliteStore, Store};
use crate::tls::{certified_key_from_pem, CertStore, HandshakeCallbacks, SniResolver};

/// Builds the tenants of `config`.
fn build_tenants(config: &Config) -> anyhow::Result<TenantMap> {
    config
        .tenants
        .iter()
        .map(|t| {
            Tenant::new(t)
                .map(|rt| (t.id.clone(), Arc::new(rt)))
                .with_context(|| format!("tenant {}", t.id))
        })
        .collect()
}

/// Publishes the static certificates and the configured domains' hosts.
fn install_static(
    config: &Config,
    certs: &CertStore,
    hosts: &HostMap,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    for c in &config.certificates {
        let loaded = Arc::new(
            certified_key_from_pem(&c.cert_pem, &c.key_pem.0)
                .with_context(|| format!("certificate {}", c.cert_file.display()))?,
        );
        for h in &c.hostnames {
            certs.insert(h, loaded.clone())?;
            metrics
                .certificate_expiry
                .with_label_values(&[h])
                .set(loaded.not_after);
        }
    }
    for d in &config.domains {
        hosts.insert(d.hostname.clone(), HostRoute::new(&d.hostname, &d.tenant));
    }
    Ok(())
}

/// Applies the stored revocations with an id above `after`; returns the id of the last one
/// applied (`after` when there is none). Applying a revocation twice changes nothing.
async fn apply_revocations(
    store: &dyn Store,
    revocations: &Revocations,
    after: i64,
) -> Result<i64, crate::store::StoreError> {
    let mut last = after;
    for (id, r) in store.revocations_since(after).await? {
        revocations.apply(&r);
        last = last.max(id);
    }
    Ok(last)
}

/// Opens the store and prepares everything the services share.
pub async fn build_gateway(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Gateway>> {
    let store: Arc<dyn Store> = match &config.store {
        StoreUrl::Sqlite(path) => Arc::new(
            SqliteStore::open(path)
                .with_context(|| format!("opening the store at {}", path.display()))?,
        ),
    };
    let revocations = Revocations::default();
    let applied = apply_revocations(&*store, &revocations, 0).await?;
    metrics.revocations.set(revocations.len() as i64);
    let (kid, der) = crate::assertion::generate_key()?;
    let (kid, der) = store.signing_key(&kid, &der).await?;
    let signer = AssertionSigner::new(kid, &der)?;
    let certs = Arc::new(CertStore::default());
    let hosts = HostMap::default();
    install_static(&config, &certs, &hosts, &metrics)?;
    // Nothing else is served yet; the domain manager adds its own when it loads.
    metrics
        .domains
        .with_label_values(&["active"])
        .set(config.static_domains().count() as i64);
    let tenants = build_tenants(&config)?;
    let gw = Gateway {
        cookie_name: config.session.cookie_name.clone(),
        sealer: SessionSealer::new(&config.session.secret.0),
        https_port: config.server.https_listen.port(),
        tenants: ArcSwap::from_pointee(tenants),
        hosts,
        certs,
        revocations,
        revocations_applied: AtomicI64::new(applied),
        store,
        signer,
        metrics,
        acme_challenges: DashMap::new(),
        claims_cache: crate::session::SessionCache::new(100_000),
        session_cache: crate::session::SessionCache::new(100_000),
        in_flight: Arc::new(AtomicUsize::new(0)),
        draining: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        config: ArcSwap::from_pointee(config),
    };
    Ok(Arc::new(gw))
}

/// Re-reads the configuration file and swaps tenants, keys, hosts and static certificates
/// in place. Settings that need a restart (listeners, store, session secret) are reported.
pub fn reload(gw: &Gateway) -> Result<(), Vec<String>> {
    let path = gw.config.load().path.clone();
    let new = Config::load(&path).map_err(|e| e.problems)?;
    let old = gw.config.load();
    let mut restart = Vec::new();
    if new.server.https_listen != old.server.https_listen
        || new.server.http_listen != old.server.http_listen
        || new.server.admin_listen != old.server.admin_listen
    {
        restart.push("server listeners");
    }
    if new.store != old.store {
        restart.push("store.url");
    }
    // The domain manager (DNS checker, ACME client) is built once, at start-up.
    if new.acme != old.acme {
        restart.push("[acme]");
    }
    if new.dns != old.dns {
        restart.push("[dns]");
    }
    if new.session.secret.0 != old.session.secret.0
        || new.session.cookie_name != old.session.cookie_name
    {
        restart.push("session");
    }
    if !restart.is_empty() {
        return Err(vec![format!(
            "changes to {} need a restart; nothing was reloaded",
            restart.join(", ")
        )]);
    }
    let tenants = build_tenants(&new).map_err(|e| vec![format!("{e:#}")])?;
    let certs = CertStore::default();
    let hosts = HostMap::default();
    install_static(&new, &certs, &hosts, &gw.metrics).map_err(|e| vec![format!("{e:#}")])?;
    // Publish: new names first, then drop the ones no longer configured.
    for h in hosts.iter() {
        if let Some(c) = certs.get(h.key()) {
            let _ = gw.certs.insert(h.key(), c);
        }
    }
    for c in &new.certificates {
        for h in &c.hostnames {
            if let Some(cert) = certs.get(h) {
                let _ = gw.certs.insert(h, cert);
            }
        }
    }
    for c in &old.certificates {
        for h in &c.hostnames {
            if !certs.contains(h) {
                gw.certs.remove(h);
                let _ = gw.metrics.certificate_expiry.remove_label_values(&[h]);
            }
        }
    }
    gw.tenants.store(Arc::new(tenants));
    // Only names that were `[[domains]]` entries and are no longer: the host map also holds
    // the domains the admin API and ACME published, which the file does not list.
    for d in &old.domains {
        if !hosts.contains_key(&d.hostname) {
            gw.hosts.remove(&d.hostname);
        }
    }
    for (k, v) in hosts {
        gw.hosts.insert(k, v);
    }
    gw.config.store(Arc::new(new));
    // Cached sessions carry header values built from the old tenant settings.
    gw.session_cache.clear();
    Ok(())
}

/// Background work: revocations from the store every second (other nodes' too), upstream
/// health checks, pruning, readiness, and SIGHUP reloads.
struct Housekeeping {
    gw: Arc<Gateway>,
    listeners: [SocketAddr; 3],
    /// Set while a round of upstream health checks runs: rounds never overlap.
    health_round: Arc<AtomicBool>,
    /// True when the domain manager runs (ACME on at start-up).
    custom_domains: bool,
    /// The SIGHUP stream `serve` opened first thing: a SIGHUP during start-up neither kills
    /// the process nor is lost (it reloads once this loop runs).
    hangup: std::sync::Mutex<Option<tokio::signal::unix::Signal>>,
}

/// Replaces SIGHUP's default action (terminate) with tokio's handler and returns the stream
/// of its deliveries, or `None` (logged) when it cannot be installed.
fn hangup_stream() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reloads are off");
            None
        }
    }
}

/// Tenants whose upstreams one health-check round checks at once.
const HEALTH_CHECK_CONCURRENCY: usize = 64;

/// Starts a round of upstream health checks for every tenant, unless the previous round still
/// runs. It runs beside the housekeeping loop, not in it: an upstream that drops SYNs holds its
/// check for a second, and revocations from other nodes must still apply within one.
fn spawn_health_round(
    tenants: Arc<TenantMap>,
    running: &Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    use futures::StreamExt;

    /// Clears the flag when the round ends, however it ends.
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }

    if running.swap(true, Ordering::AcqRel) {
        return None;
    }
    let done = Done(running.clone());
    Some(tokio::spawn(async move {
        let _done = done;
        futures::stream::iter(tenants.values())
            .for_each_concurrent(HEALTH_CHECK_CONCURRENCY, |t| t.upstream.check_health())
            .await;
    }))
}

/// True when every listener address is taken (by this process's listeners): probing by
/// binding opens no connection, so it shows in no handshake metric.
fn listeners_bound(addrs: &[SocketAddr]) -> bool {
    addrs.iter().all(|a| {
        matches!(std::net::TcpListener::bind(a), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = &self.gw;
        // Go on from what build_gateway applied: rows other nodes wrote since then are read
        // on the first tick, not skipped.
        let mut last_revocation = gw.revocations_applied.load(Ordering::Acquire);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let early = self.hangup.lock().ok().and_then(|mut h| h.take());
        let mut hup = early.or_else(hangup_stream);
        let mut seconds = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                    match reload(gw) {
                        Ok(()) => {
                            // With custom domains, the domain manager recounts every state
                            // when it sees the new config (within a second).
                            if !self.custom_domains {
                                let n = gw.config.load().static_domains().count() as i64;
                                gw.metrics.domains.with_label_values(&["active"]).set(n);
                            }
                            tracing::info!("configuration reloaded");
                        }
                        Err(problems) => {
                            for p in problems {
                                tracing::error!(problem = %p, "configuration not reloaded");
                            }
                        }
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            seconds += 1;
            if !gw.ready.load(Ordering::Acquire) && listeners_bound(&self.listeners) {
                gw.ready.store(true, Ordering::Release);
                tracing::info!("listeners bound; ready");
            }
            match apply_revocations(&*gw.store, &gw.revocations, last_revocation).await {
                Ok(last) => {
                    last_revocation = last;
                    gw.metrics.revocations.set(gw.revocations.len() as i64);
                }
                Err(e) => tracing::warn!(error = %e, "cannot read revocations"),
            }
            if seconds % 5 == 1 {
                spawn_health_round(gw.tenants.load_full(), &self.health_round);
            }
            if seconds % 3600 == 0 {
                if let Err(e) = gw.store.prune(now()).await {
                    tracing::warn!(error = %e, "pruning the store failed");
                }
                gw.claims_cache.clear();
            }
        }
    }
}

/// Runs the gateway until SIGTERM/SIGINT (both graceful); never returns on success.
pub fn serve(
    config: Config,
    metrics: Arc<Metrics>,
    extra: Vec<Box<dyn pingora::services::ServiceWithDependents>>,
) -> anyhow::Result<()> {
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // First of all: until a handler is installed, SIGHUP's default action ends the process
    // (and systemd's Restart=on-failure does not bring it back). The stream only reads a
    // process-wide registry, so the housekeeping loop can use it on pingora's runtime.
    let hangup = startup.block_on(async { hangup_stream() });
    let https = config.server.https_listen;
    let http_addr = config.server.http_listen;
    let admin = config.server.admin_listen;
    let threads = match config.server.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    // pingora binds in its service threads, where a port in use is a panic in one thread and
    // the process runs on half-started: find out here and exit with the reason instead.
    for (key, addr) in [
        ("server.https_listen", https),
        ("server.http_listen", http_addr),
        ("server.admin_listen", admin),
    ] {
        std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("{key} = {addr}: cannot listen: {e}"))?;
    }
    let acme_enabled = config.acme.enabled;
    let gw = startup.block_on(build_gateway(config, metrics))?;
    let domains = if acme_enabled {
        let dm = Arc::new(DomainManager::new(gw.clone(), &gw.config.load())?);
        let served = startup.block_on(dm.load())?;
        tracing::info!(served, "custom-domain certificates loaded");
        Some(dm)
    } else {
        None
    };
    drop(startup);

    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(10),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, GatewayProxy::new(gw.clone()));
    let mut tls =
        TlsSettings::with_callbacks(Box::new(HandshakeCallbacks::new(gw.metrics.clone())))?;
    tls.set_cert_resolver(Arc::new(SniResolver::new(
        gw.certs.clone(),
        gw.metrics.clone(),
    )));
    tls.enable_h2();
    proxy.add_tls_with_settings(&https.to_string(), None, tls);

    let mut http = Service::new("http".to_string(), HttpRedirect::new(gw.clone()));
    http.add_tcp(&http_addr.to_string());
    let mut admin_svc = Service::new(
        "admin".to_string(),
        AdminApi::new(gw.clone(), domains.clone()),
    );
    admin_svc.add_tcp(&admin.to_string());
    let housekeeping = background_service(
        "housekeeping",
        Housekeeping {
            gw: gw.clone(),
            listeners: [https, http_addr, admin],
            health_round: Arc::default(),
            custom_domains: domains.is_some(),
            hangup: std::sync::Mutex::new(hangup),
        },
    );

    server.add_service(proxy);
    server.add_service(http);
    server.add_service(admin_svc);
    server.add_service(housekeeping);
    server.add_service(background_service(
        "webhooks",
        WebhookWorker(crate::webhooks::Dispatcher::new(gw.clone())),
    ));
    if let Some(dm) = domains {
        server.add_service(background_service("domains", DomainScheduler(dm)));
    }
    for s in extra {
        server.add_boxed_service(s);
    }
    tracing::info!(%https, http = %http_addr, %admin, threads, "linkgate starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainingShutdown { gw }),
    });
    tracing::info!("linkgate stopped");
    std::process::exit(0)
}

/// Runs webhook delivery as a pingora background service.
struct WebhookWorker(crate::webhooks::Dispatcher);

#[async_trait]
impl BackgroundService for WebhookWorker {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await;
    }
}

/// Runs the custom-domain scheduler as a pingora background service.
struct DomainScheduler(Arc<DomainManager>);

#[async_trait]
impl BackgroundService for DomainScheduler {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().run(shutdown).await;
    }
}

/// Longest time SIGTERM waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// SIGTERM and SIGINT: stop offering keep-alive, wait until in-flight requests have finished
/// (at most [`DRAIN_TIMEOUT`]), then let pingora shut down. SIGQUIT: pingora's upgrade.
struct DrainingShutdown {
    gw: Arc<Gateway>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainingShutdown {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        self.gw.draining.store(true, Ordering::Release);
        let n = self.gw.in_flight.load(Ordering::Acquire);
        tracing::info!(in_flight = n, "{name}: draining in-flight requests");
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while self.gw.in_flight.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ShutdownSignal::GracefulTerminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::Revocation;

    /// A gateway on a fresh SQLite store in `dir`, with tenant `acme`.
    async fn test_gateway(dir: &std::path::Path) -> Arc<Gateway> {
        let text = format!(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\nstate_dir = {dir:?}\n\
             [session]\nsecret = \"{s}\"\n\
             [[tenants]]\nid = \"acme\"\nupstream = [\"127.0.0.1:9\"]\n\
             [[tenants.keys]]\nkid = \"k1\"\nalg = \"HS256\"\nsecret = \"{s}\"\n",
            s = "s".repeat(32)
        );
        let config = Config::parse(&text, &dir.join("t.toml")).expect("test config");
        build_gateway(config, Arc::new(Metrics::new()))
            .await
            .expect("gateway")
    }

    #[tokio::test]
    async fn revocations_stored_during_start_up_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let jti = |j: &str| Revocation::Jti { jti: j.into() };
        let revoked = |gw: &Gateway, j: &str| gw.revocations.is_revoked("acme", "u", Some(j), 0);
        {
            // A revocation stored before the start is applied by build_gateway.
            let gw = test_gateway(dir.path()).await;
            gw.store.add_revocation(&jti("early"), now()).await.unwrap();
        }
        let gw = test_gateway(dir.path()).await;
        assert!(revoked(&gw, "early"));
        assert_eq!(gw.revocations_applied.load(Ordering::Acquire), 1);
        // Another node stores one after build_gateway read the store and before the
        // housekeeping loop starts: the loop's first round applies it.
        gw.store.add_revocation(&jti("late"), now()).await.unwrap();
        assert!(!revoked(&gw, "late"));
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let hk = Housekeeping {
            gw: gw.clone(),
            listeners: [any; 3],
            health_round: Arc::default(),
            custom_domains: false,
            hangup: std::sync::Mutex::new(None),
        };
        let (stop, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { hk.start(watch).await });
        let mut applied = false;
        for _ in 0..60 {
            if revoked(&gw, "late") {
                applied = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Later ones still arrive through the loop.
        gw.store.add_revocation(&jti("later"), now()).await.unwrap();
        let mut later = false;
        for _ in 0..60 {
            if revoked(&gw, "later") {
                later = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(applied, "a revocation stored during start-up was skipped");
        assert!(later, "a revocation stored after start-up was not applied");
    }
    fn tenant(id: &str, upstream: SocketAddr) -> Arc<Tenant> {
        Arc::new(Tenant::for_test(id, upstream, &[]))
    }

    #[tokio::test]
    async fn health_rounds_run_beside_the_loop_and_never_overlap() {
        // A closed port fails every check at once; a listening one passes (the kernel
        // completes the handshake without an accept).
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let listening = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listening.local_addr().unwrap();
        let mut map = TenantMap::default();
        map.insert("a".into(), tenant("a", closed));
        map.insert("b".into(), tenant("b", open));
        let tenants = Arc::new(map);
        let running = Arc::new(AtomicBool::new(false));

        let first = spawn_health_round(tenants.clone(), &running).expect("a round starts");
        assert!(
            spawn_health_round(tenants.clone(), &running).is_none(),
            "a round does not start while the previous one runs"
        );
        first.await.unwrap();
        assert!(
            !running.load(Ordering::Acquire),
            "the flag clears at the end"
        );
        assert_eq!(
            tenants["a"].upstream.is_healthy(closed),
            Some(true),
            "one failure is not enough"
        );
        spawn_health_round(tenants.clone(), &running)
            .expect("the next round starts")
            .await
            .unwrap();
        assert_eq!(tenants["a"].upstream.is_healthy(closed), Some(false));
        assert_eq!(tenants["b"].upstream.is_healthy(open), Some(true));
    }
}
