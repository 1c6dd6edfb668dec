//! Loaders of the files the config names: the subscription map and the allowlist (also on
//! SIGHUP), and the check that each named file (TLS material included) can be used, so that a
//! broken file fails `check-config`, not a session hours later. Each problem names its key.

use std::collections::HashSet;
use std::path::Path;

use super::model::Config;
use crate::ledger::{BillingRules, SubscriptionMap};

impl Config {
    /// Problems in the files the config names: they are part of it, so a broken map fails
    /// check-config, not a session hours later.
    pub(super) fn file_problems(&self) -> Vec<String> {
        let mut problems = self.billing_rules().err().unwrap_or_default();
        if let Some(Err(e)) = self.proxy.tls.as_ref().map(crate::tls::server_config) {
            problems.push(e.to_string());
        }
        if let Some(Err(e)) = self
            .proxy
            .upstream_ca_file
            .as_deref()
            .map(|ca| crate::tls::client_config(Some(ca)))
        {
            problems.push(e.to_string());
        }
        if let Some(Err(e)) = self.proxy.allowlist_file.as_deref().map(load_allowlist) {
            problems.push(e);
        }
        problems
    }

    /// The ledger's rules, reading `billing.subscription_map_file` (also on SIGHUP).
    pub fn billing_rules(&self) -> Result<BillingRules, Vec<String>> {
        let subscriptions = match &self.billing.subscription_map_file {
            None => None,
            Some(path) => Some(load_subscription_map(path)?),
        };
        Ok(BillingRules {
            mode: self.billing.mode,
            metric_code: self.lago.metric_code.clone(),
            transaction_id: self.billing.transaction_id.clone(),
            external_subscription_id: self.billing.external_subscription_id.clone(),
            subscriptions,
            future_tolerance_secs: secs(self.billing.future_timestamp_tolerance),
            max_clock_lag_secs: secs(self.billing.max_clock_lag),
            id_tag_case: self.billing.id_tag_case,
            meter_start_tolerance_wh: rust_decimal::Decimal::from(
                self.billing.meter_start_tolerance_wh,
            ),
        })
    }
}

/// A duration in whole seconds as the ledger's i64 (saturating: no config can overflow it).
fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Reads an id_tag → external_subscription_id map: CSV unless the file name ends in `.toml`.
pub fn load_subscription_map(path: &Path) -> Result<SubscriptionMap, Vec<String>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "`billing.subscription_map_file`: cannot read {name}: {e}"
        )]
    })?;
    let parsed = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
    {
        SubscriptionMap::from_toml(&text)
    } else {
        SubscriptionMap::from_csv(&text)
    };
    parsed.map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("`billing.subscription_map_file` {name}: {e}"))
            .collect()
    })
}

/// Reads the chargeBoxId allowlist: one id per line, blank lines and `#` comments ignored.
pub fn load_allowlist(path: &Path) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "`proxy.allowlist_file`: cannot read {}: {e}",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect())
}
