//! What each chain's preset lets through, with the reason for every entry. The one place
//! these lists live; the config adds to them (`allow_paths`, `allow_methods`, `deny_methods`)
//! and a deny always wins over an allow.

/// A list entry and why it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub glob: &'static str,
    pub why: &'static str,
}

/// A chain's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    /// Paths that take JSON-RPC calls by `POST`.
    pub post_paths: &'static [Entry],
    /// Paths where a `GET /{method}?params` is a call of `{method}` (CometBFT's URI form).
    pub get_method_paths: &'static [Entry],
    /// Paths that may be upgraded to WebSocket.
    pub websocket_paths: &'static [Entry],
    /// Whether messages on `websocket_paths` are JSON-RPC calls (filtered call by call), or
    /// the node's own subscription protocol (no method to filter: checked as bounded JSON and
    /// counted as one call each). Paths added by `allow_paths` always carry calls.
    pub websocket_calls: bool,
    pub allow_methods: &'static [Entry],
    /// Denied even when an allow glob matches.
    pub deny_methods: &'static [Entry],
    /// Denied unless the config's `allow_methods` names exactly this glob.
    pub deny_unless_allowed: &'static [Entry],
    /// Default `max_batch`.
    pub max_batch: usize,
}

const fn entry(glob: &'static str, why: &'static str) -> Entry {
    Entry { glob, why }
}

/// ICON's goloop. Its port 9000 also serves node management and debugging; only the public
/// API passes. Refused by omission: `/admin/*` (node management, unauthenticated when no users
/// are configured), `/api/v3d*` (debug API), `/api/rosetta*` (Rosetta), `/metrics`
/// (Prometheus), and everything else.
pub const ICON: Preset = Preset {
    name: "icon",
    post_paths: &[
        entry("/api/v3", "the public JSON-RPC API (default channel)"),
        entry("/api/v3/*", "the public JSON-RPC API of one channel"),
    ],
    get_method_paths: &[],
    websocket_paths: &[
        entry("/api/v3/*/block", "block notifications of one channel"),
        entry("/api/v3/*/event", "event notifications of one channel"),
    ],
    // goloop's block and event sockets take a {"height": ...} request, not JSON-RPC.
    websocket_calls: false,
    allow_methods: &[
        entry(
            "icx_*",
            "the ICX API: blocks, balances, calls, transactions",
        ),
        entry("btp_*", "BTP: network and proof queries"),
    ],
    deny_methods: &[entry(
        "debug_*",
        "the debug namespace: traces and step estimation, expensive and not for the public",
    )],
    deny_unless_allowed: &[],
    max_batch: 10,
};

/// Ethereum execution clients (geth, Nethermind, Erigon, Besu) on their HTTP/WS RPC port.
pub const ETHEREUM: Preset = Preset {
    name: "ethereum",
    post_paths: &[entry("/", "the JSON-RPC endpoint")],
    get_method_paths: &[],
    websocket_paths: &[entry("/", "the WebSocket endpoint, for eth_subscribe")],
    websocket_calls: true,
    allow_methods: &[
        entry(
            "eth_*",
            "chain state, calls, raw transactions, subscriptions",
        ),
        entry("net_*", "network id and peer count"),
        entry("web3_*", "client version and sha3"),
    ],
    deny_methods: &[
        entry(
            "admin_*",
            "node administration: peers, RPC servers, chain export",
        ),
        entry(
            "debug_*",
            "tracing and internals: expensive, some write state",
        ),
        entry("personal_*", "account keys held by the node"),
        entry("miner_*", "block production settings"),
        entry(
            "engine_*",
            "the consensus client's Engine API: never public",
        ),
        entry("eth_sign*", "signing with the node's keys"),
        entry(
            "eth_sendTransaction",
            "sending from the node's own accounts",
        ),
    ],
    deny_unless_allowed: &[entry(
        "txpool_*",
        "mempool contents: large and useful to front-runners; allow with allow_methods = [\"txpool_*\"]",
    )],
    max_batch: 100,
};

/// CometBFT (Cosmos SDK chains) RPC: JSON-RPC by `POST /`, the same calls as `GET /{method}`,
/// and WebSocket subscriptions on `/websocket`.
pub(crate) const COSMOS: Preset = Preset {
    name: "cosmos",
    post_paths: &[entry("/", "the JSON-RPC endpoint")],
    get_method_paths: &[entry("/*", "URI-form calls, such as GET /status")],
    websocket_paths: &[entry("/websocket", "event subscriptions")],
    websocket_calls: true,
    allow_methods: &[entry(
        "*",
        "the RPC is public by design; the dangerous routes are denied below",
    )],
    deny_methods: &[
        entry(
            "dial_seeds",
            "makes the node dial addresses the caller chooses",
        ),
        entry(
            "dial_peers",
            "makes the node dial addresses the caller chooses",
        ),
        entry("unsafe_*", "mempool flushing and profiling"),
    ],
    deny_unless_allowed: &[],
    max_batch: 10,
};

/// Nothing but what the config lists.
pub(crate) const NONE: Preset = Preset {
    name: "none",
    post_paths: &[],
    get_method_paths: &[],
    websocket_paths: &[],
    websocket_calls: true,
    allow_methods: &[],
    deny_methods: &[],
    deny_unless_allowed: &[],
    max_batch: 10,
};

/// Every preset, by the name the config uses.
pub const ALL: [Preset; 4] = [ICON, ETHEREUM, COSMOS, NONE];

/// The preset called `name`.
#[must_use]
pub(crate) fn by_name(name: &str) -> Option<Preset> {
    ALL.into_iter().find(|p| p.name == name)
}
