//! `xpm search WORDS`: experts whose name or description contains every word.

use crate::error::Result;
use crate::home::XpmHome;
use crate::registry::{self, ClientOptions, SearchResults};

pub fn search(
    home: &XpmHome,
    query: &str,
    limit: usize,
    location: &str,
    opts: &ClientOptions,
) -> Result<SearchResults> {
    let reg = registry::open(location, home, opts, false)?;
    reg.search(query, limit)
}

/// The human table of results.
pub fn render(r: &SearchResults) -> String {
    let mut out = String::new();
    let w = r
        .experts
        .iter()
        .map(|h| h.name.len() + h.max_version.to_string().len() + 3)
        .max()
        .unwrap_or(0);
    for h in &r.experts {
        let id = format!("{} = \"{}\"", h.name, h.max_version);
        out.push_str(&format!(
            "{id:<w$}  # {} {}: {}\n",
            h.kind,
            h.base.id,
            h.description.as_deref().unwrap_or("")
        ));
    }
    if r.total > r.experts.len() {
        out.push_str(&format!(
            "… and {} more (use --limit)\n",
            r.total - r.experts.len()
        ));
    }
    out
}
