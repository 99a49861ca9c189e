//! The QUIC east-west gateway (filled by the gateway issue).
