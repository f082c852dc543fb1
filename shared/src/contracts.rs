//! Message contracts: one payload type per message type, versioned.

use serde::{Deserialize, Serialize};

use crate::envelope::Contract;

/// Ask the mailer to render `template` with `data` and send it to `to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmailRequested {
    pub to: String,
    pub template: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Contract for EmailRequested {
    const TYPE: &'static str = "notify.email";
    const VERSION: u16 = 1;
}
