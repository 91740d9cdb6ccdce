//! `xpm list`: the expert versions installed in this `$XPM_HOME`.

use crate::error::Result;
use crate::home::XpmHome;
use crate::store::{Installed, Store};

pub fn list(home: &XpmHome) -> Result<Vec<Installed>> {
    Store::new(home).installed()
}

/// The human table.
pub fn render(items: &[Installed]) -> String {
    if items.is_empty() {
        return "no experts installed (install some with `xpm install NAME@REQ`)\n".into();
    }
    let rows: Vec<[String; 5]> = items
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.version.to_string(),
                i.kind.to_string(),
                i.base.id.clone(),
                i.source.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "VERSION", "KIND", "BASE", "SOURCE"].map(String::from);
    let mut w = [0usize; 5];
    for r in std::iter::once(&header).chain(&rows) {
        for (k, c) in r.iter().enumerate() {
            w[k] = w[k].max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<a$}  {:<b$}  {:<c$}  {:<d$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            a = w[0],
            b = w[1],
            c = w[2],
            d = w[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
