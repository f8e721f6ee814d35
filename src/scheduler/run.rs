//! `localnfs scheduler`: starts the watches, gets the webhook certificate, and serves
//! the webhooks (TLS: `/mutate`, `/validate`, `/validate-claims`) and extender (plain
//! HTTP) listeners until SIGTERM.

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio_rustls::TlsAcceptor;

use super::agents::Agents;
use super::claims_review::ClaimGuard;
use super::routes::{Helper, HelperMetrics};
use super::tls::{self, Resolver, SecretSource, Source, WebhookConfig};
use super::watch;
use crate::admin;
use crate::cli::SchedulerArgs;
use crate::error::{Error, Result};
use crate::server::bind;

/// Webhook and extender calls in flight at once; the API server and kube-scheduler
/// each keep a handful of connections.
const MAX_CONNECTIONS: usize = 256;

pub async fn run(args: SchedulerArgs) -> Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let client = crate::kubeclient::limited_client(
        args.kube.kubeconfig.as_deref(),
        args.kube.rate(crate::kubeclient::SCHEDULER_RATE),
    )
    .await?;
    let mut registry = crate::metrics::registry("scheduler");
    let metrics = HelperMetrics::register(&mut registry);
    let admin = admin::start(args.admin.admin_addr, registry, &shutdown).await?;
    let readiness = admin.readiness.clone();
    let webhook_listener = bind("webhook", args.webhook_listen).await?;
    let extender_listener = bind("extender", args.extender_listen).await?;

    let source = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => Source::Secret(Box::new(SecretSource {
            secrets: Api::<Secret>::namespaced(client.clone(), &args.install.namespace),
            name: args.tls_secret.clone(),
            names: tls::service_names(&args.service_name, &args.install.namespace, &args.tls_san),
            webhook_configs: [
                (!args.webhook_config.is_empty()).then(|| {
                    WebhookConfig::Mutating(
                        Api::<MutatingWebhookConfiguration>::all(client.clone()),
                        args.webhook_config.clone(),
                    )
                }),
                (!args.agent_webhook_config.is_empty()).then(|| {
                    WebhookConfig::Validating(
                        Api::<ValidatingWebhookConfiguration>::all(client.clone()),
                        args.agent_webhook_config.clone(),
                    )
                }),
                (!args.claim_webhook_config.is_empty()).then(|| {
                    WebhookConfig::Validating(
                        Api::<ValidatingWebhookConfiguration>::all(client.clone()),
                        args.claim_webhook_config.clone(),
                    )
                }),
            ]
            .into_iter()
            .flatten()
            .collect(),
        })),
        _ => {
            return Err(Error::Tls(
                "give both --tls-cert-file and --tls-key-file, or neither".into(),
            ));
        }
    };
    let resolver = Resolver::new(source.current().await?);
    let acceptor = TlsAcceptor::from(tls::server_config(resolver.clone())?);
    let refresh = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(tls::REFRESH) => {}
                }
                match source.current().await {
                    Ok(key) => resolver.set(key),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot refresh the webhook certificate; keeping the current one")
                    }
                }
            }
        }
    });

    let inventory = watch::Shared::default();
    let mut synced = watch::start(
        &client,
        &args.install.provisioner_name,
        &args.install.heartbeats.heartbeat_namespace,
        &inventory,
        &shutdown,
    );
    let agents = Agents::new(
        client.clone(),
        &args.install.namespace,
        &args.install.heartbeats.heartbeat_namespace,
        &args.node_service_account,
    );
    let claims = ClaimGuard::new(
        &args.install.namespace,
        &args.controller_service_account,
        &args.node_service_account,
    );
    let helper = Arc::new(Helper {
        inventory,
        metrics,
        agents: Some(agents),
        claims,
    });
    let webhook = tokio::spawn(crate::web::serve(
        "webhook",
        webhook_listener,
        MAX_CONNECTIONS,
        Some(acceptor),
        helper.clone(),
        shutdown.clone(),
    ));
    let extender = tokio::spawn(crate::web::serve(
        "extender",
        extender_listener,
        MAX_CONNECTIONS,
        None,
        helper,
        shutdown.clone(),
    ));
    tracing::info!(
        webhook = %args.webhook_listen,
        extender = %args.extender_listen,
        "scheduler helper serving"
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = synced.wait_for(|s| *s) => {
            if r.is_ok() {
                tracing::info!("caches synced; ready");
                readiness.set(true);
            }
        }
    }
    shutdown.cancelled().await;
    readiness.set(false);
    for task in [webhook, extender, admin.task, refresh] {
        // A task that panicked already logged it; shutting down regardless.
        let _ = task.await;
    }
    tracing::info!("scheduler helper stopped");
    Ok(())
}
