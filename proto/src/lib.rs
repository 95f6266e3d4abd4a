//! fedmesh v1 gRPC API: the types, clients and servers generated from
//! `proto/fedmesh/v1`, and the encoded descriptor set that every component
//! serves through gRPC reflection. This crate holds no logic.

/// Generated code for the `fedmesh.v1` package.
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fedmesh.v1");
}

/// The encoded `FileDescriptorSet` of the v1 API, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fedmesh_descriptor.bin"));
