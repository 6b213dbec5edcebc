//! The `LivePatch` API types (custom resources) shared by the operator and the node agent.
