//! ring (placeholder)
