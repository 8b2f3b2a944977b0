//! Webhooks: events written to a durable outbox (in the same store transaction as the state
//! change that causes them), delivered at least once with retries and capped exponential
//! backoff, signed per the Standard Webhooks scheme. Receivers must be `https://` on public
//! addresses unless `[webhooks] allow_private_targets`; the address checked is the address
//! connected to, and redirects are never followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::config::Config;
use crate::gateway::{now, Gateway};
use crate::store::{Delivery, NewDelivery};

/// Longest wait between attempts (seconds).
const MAX_BACKOFF: i64 = 3600;
/// A delivery is abandoned after this long undelivered (seconds): three days.
const MAX_AGE: i64 = 3 * 86_400;

/// The deliveries `event` causes for `tenant`: one per subscribed webhook.
pub fn events_for(config: &Config, tenant: &str, event: &str, data: Value) -> Vec<NewDelivery> {
    let Some(t) = config.tenant(tenant) else {
        return Vec::new();
    };
    let body = json!({
        "type": event,
        "timestamp": crate::admin::rfc3339(now()),
        "data": data,
    })
    .to_string();
    t.webhooks
        .iter()
        .filter(|w| w.events.iter().any(|e| e == event))
        .map(|w| NewDelivery {
            msg_id: format!(
                "msg_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
            ),
            tenant: tenant.to_string(),
            url: w.url.clone(),
            event: event.to_string(),
            body: body.clone(),
        })
        .collect()
}

/// `webhook-signature` value: `v1,` + base64(HMAC-SHA256(secret, "id.timestamp.body")).
pub fn signature(secret: &[u8], msg_id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// True for addresses a tenant may not aim webhooks at by default.
pub fn is_private(ip: IpAddr) -> bool {
    match crate::link::canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let o = v6.octets();
            let embedded = |a: usize| IpAddr::from([o[a], o[a + 1], o[a + 2], o[a + 3]]);
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                // NAT64 (64:ff9b::/96, RFC 6052): a translator reaches the IPv4 address in
                // the last 32 bits. The local-use prefix 64:ff9b:1::/48 (RFC 8215) is private.
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_private(embedded(12)))
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
                // 6to4 (2002::/16, RFC 3056): the relay reaches the IPv4 address in bits 16-47.
                || (s[0] == 0x2002 && is_private(embedded(2)))
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("webhook no longer configured")]
    Gone,
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// Delivers queued webhooks.
pub struct Dispatcher {
    gw: Arc<Gateway>,
}

impl Dispatcher {
    /// A dispatcher over the shared state.
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }

    async fn target(
        &self,
        url: &str,
        allow_private: bool,
    ) -> Result<(String, SocketAddr), AttemptError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| AttemptError::Refused(format!("`{url}` is not a URL")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if allow_private => false,
            _ => {
                return Err(AttemptError::Refused(
                    "receivers must be https:// (allow_private_targets permits http://)".into(),
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| AttemptError::Refused("no host in URL".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| AttemptError::Failed(format!("cannot resolve {host}: {e}")))?
            .collect();
        let addr = addrs
            .iter()
            .copied()
            .find(|a| allow_private || !is_private(a.ip()))
            .ok_or_else(|| {
                AttemptError::Refused(format!(
                    "{host} resolves only to loopback/private addresses (allow_private_targets is off)"
                ))
            })?;
        Ok((host, addr))
    }

    async fn attempt(&self, d: &Delivery) -> Result<(), AttemptError> {
        let config = self.gw.config.load();
        let hook = config
            .tenant(&d.msg.tenant)
            .and_then(|t| t.webhooks.iter().find(|w| w.url == d.msg.url))
            .ok_or(AttemptError::Gone)?;
        let allow_private = config.webhooks.allow_private_targets;
        let (host, addr) = self.target(&d.msg.url, allow_private).await?;
        // The connection goes to the address just checked: no second lookup, no redirects,
        // and no proxy from HTTP(S)_PROXY/ALL_PROXY (it would connect wherever it likes).
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.webhooks.timeout)
            .resolve(&host, addr)
            .user_agent("linkgate-webhooks")
            .build()
            .map_err(|e| AttemptError::Failed(e.to_string()))?;
        let ts = now();
        let resp = client
            .post(&d.msg.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.msg.msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                signature(&hook.secret.0, &d.msg.msg_id, ts, &d.msg.body),
            )
            .body(d.msg.body.clone())
            .send()
            .await
            .map_err(|e| AttemptError::Failed(format!("{}", e.without_url())))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(AttemptError::Failed(format!(
                "receiver answered {}",
                resp.status()
            )))
        }
    }

    /// Delivers what is due, every second, until shutdown.
    pub async fn run(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let m = &self.gw.metrics.webhook_deliveries;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let due = match self.gw.store.due_deliveries(now(), 64).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the webhook outbox");
                    continue;
                }
            };
            let results = futures::future::join_all(due.iter().map(|d| self.attempt(d))).await;
            for (d, r) in due.iter().zip(results) {
                let store = &self.gw.store;
                match r {
                    Ok(()) => {
                        m.with_label_values(&["ok"]).inc();
                        tracing::info!(event = %d.msg.event, tenant = %d.msg.tenant, webhook_id = %d.msg.msg_id, "webhook delivered");
                        let _ = store.finish_delivery(d.id).await;
                    }
                    Err(AttemptError::Gone) => {
                        tracing::warn!(event = %d.msg.event, tenant = %d.msg.tenant, "webhook removed from the config; delivery dropped");
                        let _ = store.finish_delivery(d.id).await;
                    }
                    Err(e) => {
                        m.with_label_values(&["error"]).inc();
                        let now = now();
                        if now - d.created_at > MAX_AGE {
                            tracing::error!(event = %d.msg.event, tenant = %d.msg.tenant, error = %e, "webhook abandoned after 3 days");
                            let _ = store.finish_delivery(d.id).await;
                            continue;
                        }
                        let backoff = (2i64 << d.attempts.min(20)).min(MAX_BACKOFF);
                        tracing::warn!(event = %d.msg.event, tenant = %d.msg.tenant, error = %e, retry_in_secs = backoff, "webhook delivery failed");
                        let _ = store
                            .retry_delivery(d.id, now + backoff, &e.to_string())
                            .await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature() {
        // Standard Webhooks reference vector (secret "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", base64 of the key).
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = signature(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_of_private_ipv4_addresses() {
        for ip in [
            // NAT64, well-known prefix: 127.0.0.1, 10.0.0.1, 169.254.169.254, 192.168.1.1
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::169.254.169.254",
            "64:ff9b::c0a8:101",
            // NAT64 local-use prefix: private whatever it embeds.
            "64:ff9b:1::8.8.8.8",
            // 6to4: 127.0.0.1, 10.0.0.1, 169.254.169.254
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["64:ff9b::808:808", "64:ff9b::1.1.1.1", "2002:808:808::1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
