//! `billing.transaction_id` / `billing.external_subscription_id` templates, validated up front.

use std::fmt;
use std::str::FromStr;

/// A value a template can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// `{transaction_id}`: the OCPP transactionId.
    TransactionId,
    /// `{charge_box_id}`.
    ChargeBoxId,
    /// `{connector_id}`.
    ConnectorId,
    /// `{id_tag}`: the Start's idTag.
    IdTag,
    /// `{started_at}`: unix seconds of the session's start.
    StartedAt,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Placeholder> {
        Some(match name {
            "transaction_id" => Placeholder::TransactionId,
            "charge_box_id" => Placeholder::ChargeBoxId,
            "connector_id" => Placeholder::ConnectorId,
            "id_tag" => Placeholder::IdTag,
            "started_at" => Placeholder::StartedAt,
            _ => return None,
        })
    }
}

/// Why a template string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{name}` is not one of the known placeholders.
    #[error(
        "unknown placeholder {{{0}}}; known: transaction_id, charge_box_id, connector_id, id_tag, started_at"
    )]
    UnknownPlaceholder(String),
    /// A `{` without its `}`, or a `}` without its `{`.
    #[error("unbalanced brace at byte {0}")]
    Unbalanced(usize),
    /// The template renders to an empty string.
    #[error("template is empty")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Placeholder),
}

/// A parsed template; it cannot hold an unknown placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues<'a> {
    /// The OCPP transactionId.
    pub ocpp_transaction_id: i64,
    /// The charge box id.
    pub charge_box_id: &'a str,
    /// The connector id.
    pub connector_id: i64,
    /// The Start's idTag.
    pub id_tag: &'a str,
    /// Unix seconds of the session's start.
    pub started_at: i64,
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        let mut offset = 0;
        while let Some(i) = rest.find(['{', '}']) {
            if rest.as_bytes()[i] == b'}' {
                return Err(TemplateError::Unbalanced(offset + i));
            }
            literal.push_str(&rest[..i]);
            let close = rest[i..]
                .find('}')
                .ok_or(TemplateError::Unbalanced(offset + i))?;
            let name = &rest[i + 1..i + close];
            if name.contains('{') {
                return Err(TemplateError::Unbalanced(offset + i));
            }
            let placeholder = Placeholder::parse(name)
                .ok_or_else(|| TemplateError::UnknownPlaceholder(name.to_owned()))?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Value(placeholder));
            offset += i + close + 1;
            rest = &rest[i + close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if parts.is_empty() {
            return Err(TemplateError::Empty);
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Template {
    /// Whether the template renders the same text for every session.
    pub fn is_constant(&self) -> bool {
        self.parts
            .iter()
            .all(|part| matches!(part, Part::Literal(_)))
    }

    /// Whether the template refers to `placeholder`.
    pub fn uses(&self, placeholder: Placeholder) -> bool {
        self.parts.contains(&Part::Value(placeholder))
    }

    /// Renders the template.
    pub fn render(&self, values: &TemplateValues<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Value(Placeholder::TransactionId) => {
                    out.push_str(&values.ocpp_transaction_id.to_string())
                }
                Part::Value(Placeholder::ChargeBoxId) => out.push_str(values.charge_box_id),
                Part::Value(Placeholder::ConnectorId) => {
                    out.push_str(&values.connector_id.to_string())
                }
                Part::Value(Placeholder::IdTag) => out.push_str(values.id_tag),
                Part::Value(Placeholder::StartedAt) => out.push_str(&values.started_at.to_string()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: TemplateValues<'static> = TemplateValues {
        ocpp_transaction_id: 42,
        charge_box_id: "CB1",
        connector_id: 2,
        id_tag: "TAG",
        started_at: 1_700_000_000,
    };

    #[test]
    fn renders_all_placeholders() {
        let t: Template = "{charge_box_id}/{connector_id}:{transaction_id}-{started_at}@{id_tag}"
            .parse()
            .unwrap();
        assert_eq!(t.render(&VALUES), "CB1/2:42-1700000000@TAG");
        assert!(t.uses(Placeholder::StartedAt));
        let t: Template = "sub_fixed".parse().unwrap();
        assert_eq!(t.render(&VALUES), "sub_fixed");
        assert!(!t.uses(Placeholder::StartedAt));
        assert_eq!(t.to_string(), "sub_fixed");
    }

    #[test]
    fn rejects_bad_templates() {
        assert_eq!(
            "{session}".parse::<Template>(),
            Err(TemplateError::UnknownPlaceholder("session".into()))
        );
        assert_eq!(
            "a{id_tag".parse::<Template>(),
            Err(TemplateError::Unbalanced(1))
        );
        assert_eq!("a}".parse::<Template>(), Err(TemplateError::Unbalanced(1)));
        assert_eq!(
            "{{id_tag}}".parse::<Template>(),
            Err(TemplateError::Unbalanced(0))
        );
        assert_eq!("".parse::<Template>(), Err(TemplateError::Empty));
    }
}
