//! The operator's commands against a running CRS (`ims-crs user list`,
//! `user show NAME`, `user delete NAME`, `ms list`): an enrolled link in
//! the `admin` role, one request, its typed reply as text for people.

use std::time::Duration;

use crate::link::{Identity, Link};
use crate::proto::crs::{CrsReply, CrsRequest};

/// Bound on each message of the operator's link.
pub const OPERATOR_TIMEOUT: Duration = Duration::from_secs(10);

/// The request a command line (`what` and the words after it) stands for.
pub fn request(what: &str, rest: &[&str]) -> Result<CrsRequest, String> {
    Ok(match (what, rest) {
        ("user", ["list"]) => CrsRequest::ListUsers {
            after: None,
            limit: 10_000,
        },
        ("user", ["show", name]) => CrsRequest::ShowUser {
            user: name.to_string(),
        },
        ("user", ["delete", name]) => CrsRequest::DeleteUser {
            user: name.to_string(),
        },
        ("ms", ["list"]) => CrsRequest::ListMs,
        _ => {
            return Err(format!(
                "unknown command '{what} {}'; see ims-crs --help",
                rest.join(" ")
            ))
        }
    })
}

/// A reply as the operator reads it.
pub fn render(reply: &CrsReply) -> String {
    match reply {
        CrsReply::Users(names) => names.iter().map(|n| format!("{n}\n")).collect(),
        CrsReply::MsList(list) => {
            let mut out = format!(
                "{:<4} {:<24} {:>8} {:>8} {:>10}\n",
                "id", "address", "load", "capacity", "heartbeat"
            );
            for ms in list {
                out.push_str(&format!(
                    "{:<4} {:<24} {:>8} {:>8} {:>9}s\n",
                    ms.id, ms.address, ms.load, ms.capacity, ms.last_heartbeat_secs
                ));
            }
            out
        }
        CrsReply::User(u) => format!("{}\n", serde_json::to_string(u).unwrap_or_default()),
        _ => "ok\n".into(),
    }
}

/// Runs one operator command against the CRS at `crs`; its output.
pub fn run(crs: &str, ms_key: &[u8], what: &str, rest: &[&str]) -> Result<String, String> {
    let req = request(what, rest)?;
    let me = Identity {
        listen: "operator".into(),
        capacity: 0,
        role: "admin",
        instance: String::new(),
    };
    let mut link = Link::enroll(crs, ms_key, &me, OPERATOR_TIMEOUT)
        .map_err(|e| format!("{e} (is the CRS running at {crs}?)"))?;
    let reply = link.call(&req).map_err(|e| e.to_string())?;
    Ok(render(&reply))
}
