//! The podfleet Kubernetes operator and admin CLI.
//!
//! It will watch Deployment custom resources (kube), write each device's
//! desired state into the NATS JetStream KV desired-state bucket using
//! [`podfleet_core::wire`]'s key builders, and fold the agents' reported
//! state back into the resources' status.
