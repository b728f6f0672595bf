//! The Hamlet federation API: protos for `v1alpha2` and `v1alpha1`, the
//! generated tonic/prost code, the catalog domain types and conversions in
//! both directions with validation, the version-neutral stream messages
//! with their v1alpha1/v1alpha2 codec ([`message`]), and the domain types'
//! JSON form ([`json`]). This crate does no I/O and knows nothing of the
//! gateway.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod convert;
pub mod domain;
pub mod json;
pub mod message;
pub mod validate;

pub use convert::{
    DecodeError, TYPE_URL_V1ALPHA1, TYPE_URL_V1ALPHA2, decode_any, encode_any, from_v1alpha1,
    to_v1alpha1, to_v1alpha2, type_url,
};
pub use domain::{
    ApiVersion, Endpoint, FederatedService, Instance, Protocol, StringMap, UnknownProtocol,
};
pub use validate::{Problem, ValidationError, is_dns_label, is_dns_name};

/// The encoded `FileDescriptorSet` of every Hamlet proto (imports included),
/// for gRPC server reflection and descriptor-level tests.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hamlet_descriptor.bin"));

/// One package of generated code, with the lints generated code is not
/// written to meet switched off for it alone.
macro_rules! generated {
    ($module:ident, $package:literal) => {
        pub mod $module {
            #![allow(
                clippy::all,
                clippy::pedantic,
                clippy::unwrap_used,
                clippy::expect_used,
                missing_docs
            )]
            tonic::include_proto!($package);
        }
    };
}

/// Code generated from `proto/` by prost and tonic (messages, clients, servers).
/// The module tree mirrors the proto packages so generated cross-references resolve.
pub mod proto {
    pub mod federation {
        pub mod types {
            generated!(v1alpha2, "federation.types.v1alpha2");
            generated!(v1alpha1, "federation.types.v1alpha1");
        }
        pub mod resourcediscovery {
            generated!(v1alpha2, "federation.resourcediscovery.v1alpha2");
            generated!(v1alpha1, "federation.resourcediscovery.v1alpha1");
        }
    }
    pub mod google {
        generated!(rpc, "google.rpc");
    }
}
