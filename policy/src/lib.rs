//! Cedar authorization, rate quotas and the decision log for meshgate.
