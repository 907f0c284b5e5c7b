//! The prompt scans (`request.prompt_entities`, `request.prompt_injection`) and the folding of
//! `request.prompt_folded` run after the decision cache is looked up, not before, so that a hit
//! skips them.
//!
//! The scanners and the folding are pure functions of the text they read: the prompt and the
//! seams of the user turns ([`crate::detect::with_seams`]). So the cache key holds that text in
//! place of their results ([`crate::PolicySet::cache_key_before_scans`]), and the key is a collision-resistant
//! hash (BLAKE3): a crafted prompt cannot share a cached benign prompt's key and skip the scans.
//!
//! [`Unscanned`] is a context whose scans have not run; only [`Unscanned::scan`] makes it a
//! [`RequestContext`] to evaluate. [`RequestContext::from_request_with`] scans at once.

use crate::context::{RequestContext, RequestInfo, ENTITY_CONFIDENCE};
use crate::detect;

/// Runs the scans still to run on one request (or batch item): both scanners read the same
/// views, built once.
fn run(r: &mut RequestInfo) {
    if r.scan.folded {
        r.prompt_folded = crate::fold::fold(&r.prompt);
        r.scan.folded = false;
    }
    if !r.scan.is_pending() {
        return;
    }
    let text = detect::joined_with_seams(&r.prompt, &r.scan.seams);
    let scanned = detect::Scanned::new(&text);
    if r.scan.entities {
        r.prompt_entities = detect::entity_names_in(&scanned, ENTITY_CONFIDENCE);
    }
    if r.scan.injection {
        r.prompt_injection = detect::injection_score_in(&scanned).0;
    }
    r.scan.entities = false;
    r.scan.injection = false;
}

/// A request's context before its prompt scans ran: what a host with a decision cache holds
/// until the key missed ([`RequestContext::unscanned`]).
#[derive(Debug, Clone)]
pub struct Unscanned(RequestContext);

impl Unscanned {
    pub(crate) fn new(ctx: RequestContext) -> Unscanned {
        Unscanned(ctx)
    }

    /// The context with the scanners' fields not filled yet (`request.prompt_entities` empty,
    /// `request.prompt_injection` 0, `request.prompt_folded` empty): for what a host reads before its cache lookup (namespace,
    /// API, principal, the token estimate), never to evaluate.
    pub fn before_scans(&self) -> &RequestContext {
        &self.0
    }

    /// [`Unscanned::before_scans`], to set what the host computes itself (the token estimate).
    pub fn before_scans_mut(&mut self) -> &mut RequestContext {
        &mut self.0
    }

    /// The context without its scans, for a host that decided without them (a cache hit): its
    /// scans are still pending, so evaluating it runs them first.
    pub fn into_before_scans(self) -> RequestContext {
        self.0
    }

    /// Runs the scans the rules read, on the request and each batch item: the context to
    /// evaluate.
    pub fn scan(mut self) -> RequestContext {
        run(&mut self.0.request);
        self.0.batch.iter_mut().for_each(run);
        self.0
    }
}

/// A context whose pending scans (if any: one taken from [`Unscanned::into_before_scans`]) run
/// on [`Unscanned::scan`].
impl From<RequestContext> for Unscanned {
    fn from(ctx: RequestContext) -> Unscanned {
        Unscanned(ctx)
    }
}

impl RequestContext {
    /// Whether a prompt scan of this context has not run (a context taken from
    /// [`Unscanned::before_scans`]): such a context must not be evaluated.
    pub fn scans_pending(&self) -> bool {
        self.request.scan.is_pending() || self.batch.iter().any(|b| b.scan.is_pending())
    }
}
