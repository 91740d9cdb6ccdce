//! `xpm owner list|add|remove NAME [IDENTITY…]`: who may publish and yank a name on an
//! `xpm-registry` server (docs/registry-protocol.md §6.1).

use crate::error::{Error, Result};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::registry::http::{HttpRegistry, Owners};
use crate::registry::{self, ClientOptions, Location};

/// What to do with the owners of a name.
#[derive(Debug, Clone)]
pub enum Change {
    List,
    Add(Vec<String>),
    Remove(Vec<String>),
}

pub fn owner(
    home: &XpmHome,
    name: &str,
    change: &Change,
    location: &str,
    opts: &ClientOptions,
    printer: &Printer,
) -> Result<Owners> {
    crate::format::manifest::validate_name(name).map_err(|e| {
        Error::input(
            format!("invalid expert name: {e}"),
            Some(registry::index::NAME_HINT),
        )
    })?;
    let url = match Location::parse(location)? {
        Location::Http(url) => url,
        _ => {
            return Err(Error::input(
                format!(
                    "`{location}` is not an xpm-registry server: only a server (an http(s):// \
                     registry) keeps owners"
                ),
                Some(
                    "a file://, directory or s3:// registry has no owners: whoever may write to \
                     it may publish and yank",
                ),
            ));
        }
    };
    let reg = HttpRegistry::new(url.as_str(), home, opts)?;
    match change {
        Change::List => reg.owners(name),
        Change::Add(who) => {
            printer.status("Adding", format!("{} as owners of {name}", who.join(", ")));
            reg.change_owners(name, who, true)
        }
        Change::Remove(who) => {
            printer.status(
                "Removing",
                format!("{} from the owners of {name}", who.join(", ")),
            );
            reg.change_owners(name, who, false)
        }
    }
}
