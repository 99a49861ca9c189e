//! The logic of the built-in admin commands, shared by the gateway's handlers and the CLI's
//! direct path (no gateway running), and the registration of those handlers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshgate_identity::{Issuer, IssuerError, RegistrationEntry, SpiffeId};
use meshgate_policy::{DecisionLog, DecisionRecord, Filter, LoadError, LogError, PolicyEngine};

use super::commands::{
    AuditCheckpoint, AuditCheckpoints, AuditExport, AuditPrune, AuditQuery, AuditVerify,
    BundleView, EntryCreate, EntryDelete, EntryList, IdentityBundle, IdentityIssue, IdentityRotate,
    IssuedSvid, PolicyReload, ReloadReply, RotateView, TokenCreate, TokenView, VerifyView,
};
use super::protocol::AdminError;
use super::server::Registry;

/// What the built-in handlers work on: the running gateway's parts.
#[derive(Debug, Clone)]
pub struct AdminContext {
    pub issuer: Arc<Issuer>,
    pub log: Arc<DecisionLog>,
    pub policy: Arc<PolicyEngine>,
}

/// Registers the identity, audit and policy commands.
pub fn builtin(registry: &mut Registry, ctx: &AdminContext) {
    let c = ctx.clone();
    registry.add(move |cmd: EntryCreate, _| cmd.run(&c.issuer, SystemTime::now()));
    let c = ctx.clone();
    registry.add(move |_: EntryList, _| list_entries(&c.issuer));
    let c = ctx.clone();
    registry.add(move |cmd: EntryDelete, _| cmd.run(&c.issuer));
    let c = ctx.clone();
    registry.add(move |cmd: TokenCreate, _| cmd.run(&c.issuer, SystemTime::now()));
    let c = ctx.clone();
    registry.add(move |cmd: IdentityIssue, _| cmd.run(&c.issuer, SystemTime::now()));
    let c = ctx.clone();
    registry.add(move |_: IdentityBundle, _| bundle(&c.issuer, SystemTime::now()));
    let c = ctx.clone();
    registry.add(move |cmd: IdentityRotate, _| cmd.run(&c.issuer, SystemTime::now()));
    let c = ctx.clone();
    registry.add(move |cmd: AuditQuery, items| {
        let filter = Filter::from(cmd);
        query(&c.log, &filter, |r| items.send(r))
    });
    let c = ctx.clone();
    registry.add(move |_: AuditVerify, _| verify(&c.log));
    let c = ctx.clone();
    registry.add(move |_: AuditExport, items| export(&c.log, |r| items.send(r)));
    let c = ctx.clone();
    registry.add(move |_: AuditCheckpoints, _| c.log.checkpoints().map_err(log_err));
    let c = ctx.clone();
    registry.add(move |_: AuditCheckpoint, _| c.log.checkpoint(SystemTime::now()).map_err(log_err));
    let c = ctx.clone();
    registry.add(move |cmd: AuditPrune, _| {
        c.log
            .prune_before(cmd.before, SystemTime::now())
            .map_err(log_err)
    });
    let c = ctx.clone();
    registry.add(move |_: PolicyReload, _| reload(&c.policy));
}

impl EntryCreate {
    pub fn run(&self, issuer: &Issuer, now: SystemTime) -> Result<RegistrationEntry, AdminError> {
        let id = parse_id(&self.spiffe_id)?;
        issuer
            .create_entry(
                &id,
                Some(Duration::from_secs(self.ttl_secs)),
                &self.dns_names,
                now,
            )
            .map_err(issuer_err)
    }
}

pub fn list_entries(issuer: &Issuer) -> Result<Vec<RegistrationEntry>, AdminError> {
    issuer.list_entries().map_err(issuer_err)
}

impl EntryDelete {
    pub fn run(&self, issuer: &Issuer) -> Result<RegistrationEntry, AdminError> {
        issuer
            .delete_entry(&parse_id(&self.spiffe_id)?)
            .map_err(issuer_err)
    }
}

impl TokenCreate {
    pub fn run(&self, issuer: &Issuer, now: SystemTime) -> Result<TokenView, AdminError> {
        let id = parse_id(&self.spiffe_id)?;
        issuer
            .create_join_token(&id, Duration::from_secs(self.ttl_secs), now)
            .map(TokenView::from)
            .map_err(issuer_err)
    }
}

impl IdentityIssue {
    pub fn run(&self, issuer: &Issuer, now: SystemTime) -> Result<IssuedSvid, AdminError> {
        let id = parse_id(&self.spiffe_id)?;
        // Only the gateway process holds the gateway identity (it issues it to itself): a
        // certificate for it would let its holder act as this cluster's gateway to peers.
        if id == SpiffeId::gateway(id.trust_domain()) {
            return Err(issuer_err(IssuerError::ReservedId { id: id.to_string() }));
        }
        let svid = issuer
            .issue_x509_svid(
                &id,
                Duration::from_secs(self.ttl_secs),
                &self.dns_names,
                &self.ips,
                now,
            )
            .map_err(issuer_err)?;
        let key_pem = svid
            .private_key_pem()
            .ok_or_else(|| AdminError::internal("the issued SVID carries no key"))?;
        Ok(IssuedSvid {
            spiffe_id: id.to_string(),
            expires_at: svid
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            svid_pem: svid.cert_chain_pem(),
            key_pem,
            bundle_pem: issuer.bundle().to_pem(),
        })
    }
}

pub fn bundle(issuer: &Issuer, now: SystemTime) -> Result<BundleView, AdminError> {
    let bundle = issuer.bundle_at(now).map_err(issuer_err)?;
    Ok(BundleView {
        spiffe_json: bundle.to_spiffe_json(),
        pem: bundle.to_pem(),
    })
}

impl IdentityRotate {
    pub fn run(&self, issuer: &Issuer, now: SystemTime) -> Result<RotateView, AdminError> {
        let status = if self.activate {
            issuer.rotate_activate(now)
        } else {
            issuer.rotate_prepare(now)
        }
        .map_err(issuer_err)?;
        Ok(RotateView {
            generation: status.generation,
            sequence: status.sequence,
        })
    }
}

/// Every record matching `filter`, oldest first, handed to `each`; returns how many.
pub fn query(
    log: &DecisionLog,
    filter: &Filter,
    mut each: impl FnMut(&DecisionRecord) -> Result<(), AdminError>,
) -> Result<u64, AdminError> {
    let mut n = 0u64;
    let mut failed = None;
    log.for_each(|r| {
        if filter.matches(&r) {
            if let Err(e) = each(&r) {
                failed = Some(e);
                return false;
            }
            n += 1;
        }
        filter.limit.is_none_or(|l| n < l as u64)
    })
    .map_err(log_err)?;
    failed.map_or(Ok(n), Err)
}

/// Every record, oldest first; returns how many.
pub fn export(
    log: &DecisionLog,
    each: impl FnMut(&DecisionRecord) -> Result<(), AdminError>,
) -> Result<u64, AdminError> {
    query(log, &Filter::default(), each)
}

pub fn verify(log: &DecisionLog) -> Result<VerifyView, AdminError> {
    log.verify()
        .map(VerifyView::from)
        .map_err(|e| AdminError::internal(format!("cannot read the decision log: {e}")))
}

/// Reloads the enforced and shadow sets. An invalid set is refused (the answer is no) and
/// the old set keeps serving; an unreadable directory is an I/O failure.
pub fn reload(policy: &PolicyEngine) -> Result<ReloadReply, AdminError> {
    let shadow = || policy.shadow_version().map(|v| v.to_string());
    match policy.reload() {
        Ok(version) => Ok(ReloadReply {
            reloaded: true,
            version: version.to_string(),
            shadow_version: shadow(),
            diagnostics: None,
        }),
        Err(LoadError::Io { path, source }) if source.kind() != std::io::ErrorKind::NotFound => {
            Err(AdminError::internal(format!(
                "cannot read `{}`: {source}",
                path.display()
            )))
        }
        Err(e) => Ok(ReloadReply {
            reloaded: false,
            version: policy.version().to_string(),
            shadow_version: shadow(),
            diagnostics: Some(e.to_string()),
        }),
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, AdminError> {
    s.parse::<SpiffeId>()
        .map_err(|e| AdminError::input(format!("invalid `--spiffe-id`: {e}")))
}

/// The issuer's own errors keep their split: the caller's fault (exit 2) or internal (3).
pub fn issuer_err(e: IssuerError) -> AdminError {
    let input = e.is_input();
    let message = format!("{:#}", anyhow::Error::from(e));
    if input {
        AdminError::input(message)
    } else {
        AdminError::internal(message)
    }
}

fn log_err(e: LogError) -> AdminError {
    AdminError::internal(e)
}
