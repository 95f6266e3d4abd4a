//! fedmesh v1 gRPC API: the types, clients and servers generated from
//! `proto/fedmesh/v1`, and the encoded descriptor set that every component
//! serves through gRPC reflection. This crate holds no logic.

/// Generated code, one module per protobuf package (generated code names
/// other packages' types by such paths).
pub mod fedmesh {
    /// The `fedmesh.v1` package.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        tonic::include_proto!("fedmesh.v1");
    }
}

/// The CloudEvents protobuf format (`io.cloudevents.v1`), in which events
/// travel over gRPC when a subscriber asks for it.
pub mod io {
    /// The `io.cloudevents` packages.
    pub mod cloudevents {
        /// The `io.cloudevents.v1` package.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
            tonic::include_proto!("io.cloudevents.v1");
        }
    }
}

/// The `fedmesh.v1` package: the API's types, clients and servers.
pub use fedmesh::v1 as pb;

/// The encoded `FileDescriptorSet` of the v1 API, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fedmesh_descriptor.bin"));
