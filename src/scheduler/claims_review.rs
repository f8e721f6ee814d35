//! The claim webhook's wire side (`POST /validate-claims`; rules in
//! [`super::claims_guard`]): reads the AdmissionReview, names the writer, and answers
//! with the rule's message (HTTP 403 in the review) or an allowance. No I/O: who
//! wrote is in the review itself.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

use super::claims_guard;

/// localnfs's own service accounts, as the API server names their users.
pub struct ClaimGuard {
    accounts: [String; 2],
}

impl ClaimGuard {
    /// The controller and the agents run as `controller` and `agents` in `namespace`.
    pub fn new(namespace: &str, controller: &str, agents: &str) -> Self {
        let user = |a: &str| format!("system:serviceaccount:{namespace}:{a}");
        Self {
            accounts: [user(controller), user(agents)],
        }
    }

    /// Answers one AdmissionReview.
    pub fn review(&self, review: AdmissionReview<DynamicObject>) -> AdmissionReview<DynamicObject> {
        let req: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
        };
        let resp = AdmissionResponse::from(&req);
        let accounts = [self.accounts[0].as_str(), self.accounts[1].as_str()];
        let writer = claims_guard::writer(req.user_info.username.as_deref(), &accounts);
        let json =
            |o: &Option<DynamicObject>| o.as_ref().and_then(|o| serde_json::to_value(o).ok());
        let (old, new) = (json(&req.old_object), json(&req.object));
        match claims_guard::check(&req.operation, writer, old.as_ref(), new.as_ref()) {
            Ok(()) => resp.into_review(),
            Err(why) => {
                let name = if req.name.is_empty() {
                    new.as_ref()
                        .and_then(|n| n["metadata"]["name"].as_str())
                        .unwrap_or("<generated>")
                        .to_owned()
                } else {
                    req.name.clone()
                };
                let namespace = req.namespace.as_deref().unwrap_or_default();
                tracing::info!(
                    user = req.user_info.username.as_deref().unwrap_or_default(),
                    namespace,
                    name = %name,
                    operation = ?req.operation,
                    %why,
                    "refused a claim write carrying localnfs's keys"
                );
                let mut resp = resp.deny(format!("localnfs: claim {namespace}/{name}: {why}"));
                resp.result.code = 403;
                resp.result.reason = "Forbidden".into();
                resp.into_review()
            }
        }
    }
}
