//! Prometheus metrics: one struct of handles, registered once at start-up, every label value of
//! the contract exported at 0 before the first event. A request costs atomic increments only.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// How a request through the gateway ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    Public,
    Redeemed,
    ConfirmPage,
    Rejected,
    AcmeChallenge,
    RedirectHttps,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Forwarded,
        Outcome::Public,
        Outcome::Redeemed,
        Outcome::ConfirmPage,
        Outcome::Rejected,
        Outcome::AcmeChallenge,
        Outcome::RedirectHttps,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Public => "public",
            Outcome::Redeemed => "redeemed",
            Outcome::ConfirmPage => "confirm_page",
            Outcome::Rejected => "rejected",
            Outcome::AcmeChallenge => "acme_challenge",
            Outcome::RedirectHttps => "redirect_https",
        }
    }
}

/// Label values of `linkgate_link_validations_total{result}`, in the order of
/// [`crate::link::LinkError::index`] (index 0 is `ok`).
pub const LINK_RESULTS: [&str; 10] = [
    "ok",
    "link_malformed",
    "link_bad_signature",
    "link_expired",
    "link_not_yet_valid",
    "link_wrong_tenant",
    "link_bad_redirect",
    "link_revoked",
    "link_binding_mismatch",
    "link_used",
];

/// Domain states of the contract (section 5).
pub const DOMAIN_STATES: [&str; 6] = [
    "pending_ownership",
    "pending_routing",
    "issuing",
    "active",
    "failed",
    "moved",
];

/// All of the gateway's metric handles.
pub struct Metrics {
    registry: Registry,
    requests: [IntCounter; 7],
    /// `linkgate_request_duration_seconds`.
    pub request_duration: Histogram,
    link_validations: Vec<IntCounter>,
    /// `linkgate_sessions_created_total`.
    pub sessions_created: IntCounter,
    /// `linkgate_upstream_errors_total`.
    pub upstream_errors: IntCounter,
    /// `linkgate_tls_handshakes_total{result="ok"}`.
    pub tls_ok: IntCounter,
    /// `linkgate_tls_handshakes_total{result="unknown_sni"}`.
    pub tls_unknown_sni: IntCounter,
    /// `linkgate_tls_handshakes_total{result="error"}`.
    pub tls_error: IntCounter,
    /// `linkgate_domains{state}`.
    pub domains: IntGaugeVec,
    /// `linkgate_certificate_expiry_timestamp_seconds{hostname}`.
    pub certificate_expiry: IntGaugeVec,
    /// `linkgate_acme_orders_total{result}`.
    pub acme_orders: IntCounterVec,
    /// `linkgate_dns_checks_total{record,result}`.
    pub dns_checks: IntCounterVec,
    /// `linkgate_webhook_deliveries_total{result}`.
    pub webhook_deliveries: IntCounterVec,
    /// `linkgate_revocations` (currently held in memory).
    pub revocations: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new("linkgate_requests_total", "Requests by how they ended"),
            &["outcome"],
        )
        .expect("static metric definition");
        let requests = Outcome::ALL.map(|o| requests_vec.with_label_values(&[o.label()]));
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "linkgate_request_duration_seconds",
                "Time from request header to response, through the gateway",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )
        .expect("static metric definition");
        let validations_vec = IntCounterVec::new(
            Opts::new(
                "linkgate_link_validations_total",
                "Magic-link validations by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let link_validations = LINK_RESULTS
            .iter()
            .map(|r| validations_vec.with_label_values(&[r]))
            .collect();
        let sessions_created = IntCounter::new(
            "linkgate_sessions_created_total",
            "Sessions created from redeemed links",
        )
        .expect("static metric definition");
        let upstream_errors = IntCounter::new(
            "linkgate_upstream_errors_total",
            "Requests that could not be proxied to the upstream",
        )
        .expect("static metric definition");
        let tls_vec = IntCounterVec::new(
            Opts::new("linkgate_tls_handshakes_total", "TLS handshakes by result"),
            &["result"],
        )
        .expect("static metric definition");
        let domains = IntGaugeVec::new(
            Opts::new("linkgate_domains", "Custom domains by state"),
            &["state"],
        )
        .expect("static metric definition");
        for s in DOMAIN_STATES {
            domains.with_label_values(&[s]);
        }
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "linkgate_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate served for each hostname",
            ),
            &["hostname"],
        )
        .expect("static metric definition");
        let acme_orders = IntCounterVec::new(
            Opts::new("linkgate_acme_orders_total", "ACME orders by result"),
            &["result"],
        )
        .expect("static metric definition");
        for r in ["ok", "error"] {
            acme_orders.with_label_values(&[r]);
        }
        let dns_checks = IntCounterVec::new(
            Opts::new("linkgate_dns_checks_total", "DNS record checks"),
            &["record", "result"],
        )
        .expect("static metric definition");
        for rec in ["ownership", "routing"] {
            for r in ["ok", "missing", "wrong_value", "error"] {
                dns_checks.with_label_values(&[rec, r]);
            }
        }
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "linkgate_webhook_deliveries_total",
                "Webhook delivery attempts by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        for r in ["ok", "error"] {
            webhook_deliveries.with_label_values(&[r]);
        }
        let revocations =
            IntGauge::new("linkgate_revocations", "Revocation entries held in memory")
                .expect("static metric definition");

        let m = Metrics {
            tls_ok: tls_vec.with_label_values(&["ok"]),
            tls_unknown_sni: tls_vec.with_label_values(&["unknown_sni"]),
            tls_error: tls_vec.with_label_values(&["error"]),
            requests,
            request_duration,
            link_validations,
            sessions_created,
            upstream_errors,
            domains,
            certificate_expiry,
            acme_orders,
            dns_checks,
            webhook_deliveries,
            revocations,
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests_vec),
            Box::new(m.request_duration.clone()),
            Box::new(validations_vec),
            Box::new(m.sessions_created.clone()),
            Box::new(m.upstream_errors.clone()),
            Box::new(tls_vec),
            Box::new(m.domains.clone()),
            Box::new(m.certificate_expiry.clone()),
            Box::new(m.acme_orders.clone()),
            Box::new(m.dns_checks.clone()),
            Box::new(m.webhook_deliveries.clone()),
            Box::new(m.revocations.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique and static");
        }
        m
    }

    /// Counts one request that ended with `outcome`.
    pub fn request(&self, outcome: Outcome) {
        self.requests[outcome as usize].inc();
    }

    /// Counts one link validation; `index` 0 is `ok`, else a `link_*` code.
    pub fn link_validation(&self, index: usize) {
        if let Some(c) = self.link_validations.get(index) {
            c.inc();
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_exported_at_start() {
        let m = Metrics::new();
        let text = String::from_utf8(m.render()).unwrap();
        for needle in [
            "linkgate_requests_total{outcome=\"redirect_https\"} 0",
            "linkgate_requests_total{outcome=\"confirm_page\"} 0",
            "linkgate_link_validations_total{result=\"link_used\"} 0",
            "linkgate_link_validations_total{result=\"ok\"} 0",
            "linkgate_tls_handshakes_total{result=\"unknown_sni\"} 0",
            "linkgate_domains{state=\"pending_routing\"} 0",
            "linkgate_dns_checks_total{record=\"routing\",result=\"wrong_value\"} 0",
            "linkgate_sessions_created_total 0",
            "linkgate_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
        m.request(Outcome::Rejected);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("linkgate_requests_total{outcome=\"rejected\"} 1"));
    }
}
