//! Property tests: arbitrary bytes, and arbitrary values in every field of
//! every request type, sent to the real servers of a mesh. Whatever comes
//! in, the answer is a precise status (never INTERNAL, UNKNOWN or a broken
//! connection), and the mesh goes on serving.

use std::time::Duration;

use fedmesh_common::identity::Identity;
use fedmesh_tests::{TestMesh, within};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use tonic::Code;

/// Cases per method and kind of input.
const CASES: usize = 48;

/// A method of a service: its path, input type and streaming.
struct Method {
    path: String,
    input: String,
    client_streaming: bool,
    server_streaming: bool,
}

fn methods(set: &FileDescriptorSet) -> Vec<Method> {
    let mut methods = Vec::new();
    for file in &set.file {
        if !file.package().starts_with("fedmesh.") {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                methods.push(Method {
                    path: format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    input: method.input_type().to_string(),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    methods
}

fn message_type<'a>(set: &'a FileDescriptorSet, full_name: &str) -> Option<&'a DescriptorProto> {
    fn find<'a>(
        prefix: &str,
        messages: &'a [DescriptorProto],
        full_name: &str,
    ) -> Option<&'a DescriptorProto> {
        messages.iter().find_map(|message| {
            let name = format!("{prefix}.{}", message.name());
            if name == full_name {
                Some(message)
            } else {
                find(&name, &message.nested_type, full_name)
            }
        })
    }
    set.file.iter().find_map(|file| {
        find(
            &format!(".{}", file.package()),
            &file.message_type,
            full_name,
        )
    })
}

/// Draws one value of `strategy`.
fn draw<T: std::fmt::Debug>(runner: &mut TestRunner, strategy: impl Strategy<Value = T>) -> T {
    strategy
        .new_tree(runner)
        .map(|tree| tree.current())
        .unwrap_or_else(|reason| panic!("no value: {reason}"))
}

/// A string that is sometimes well formed, sometimes not at all.
fn any_text(runner: &mut TestRunner) -> String {
    draw(
        runner,
        prop_oneof![
            Just(String::new()),
            "[a-z][a-z0-9-]{0,70}",
            "[a-z][a-z0-9._-]{0,140}",
            "(agency|operator|gateway)/[a-z-]{0,20}",
            "https?://[a-z0-9.:]{0,30}",
            any::<String>(),
            "\\PC{0,5000}",
        ],
    )
}

/// Appends to `buffer` an encoding of the message `full_name` whose every
/// field is absent or an arbitrary value of its type.
fn encode_arbitrary(
    runner: &mut TestRunner,
    set: &FileDescriptorSet,
    full_name: &str,
    depth: u32,
    buffer: &mut Vec<u8>,
) {
    let Some(message) = message_type(set, full_name) else {
        return;
    };
    for field in &message.field {
        let repeated = field.label() == Label::Repeated;
        let count = if repeated {
            draw(runner, 0_usize..4)
        } else {
            draw(runner, 0_usize..2)
        };
        let tag = u32::try_from(field.number()).unwrap_or(1);
        for _ in 0..count {
            match field.r#type() {
                Type::String => {
                    let text = any_text(runner);
                    encode_key(tag, WireType::LengthDelimited, buffer);
                    encode_varint(text.len() as u64, buffer);
                    buffer.extend_from_slice(text.as_bytes());
                }
                Type::Bytes => {
                    let bytes = draw(runner, prop::collection::vec(any::<u8>(), 0..2048));
                    encode_key(tag, WireType::LengthDelimited, buffer);
                    encode_varint(bytes.len() as u64, buffer);
                    buffer.extend_from_slice(&bytes);
                }
                Type::Message if depth < 4 => {
                    let mut nested = Vec::new();
                    encode_arbitrary(runner, set, field.type_name(), depth + 1, &mut nested);
                    encode_key(tag, WireType::LengthDelimited, buffer);
                    encode_varint(nested.len() as u64, buffer);
                    buffer.extend_from_slice(&nested);
                }
                Type::Message | Type::Group => {}
                Type::Double | Type::Fixed64 | Type::Sfixed64 => {
                    encode_key(tag, WireType::SixtyFourBit, buffer);
                    buffer.extend_from_slice(&draw(runner, any::<u64>()).to_le_bytes());
                }
                Type::Float | Type::Fixed32 | Type::Sfixed32 => {
                    encode_key(tag, WireType::ThirtyTwoBit, buffer);
                    buffer.extend_from_slice(&draw(runner, any::<u32>()).to_le_bytes());
                }
                _ => {
                    let value = draw(runner, prop_oneof![0_u64..4, any::<u64>(), Just(u64::MAX)]);
                    encode_key(tag, WireType::Varint, buffer);
                    encode_varint(value, buffer);
                }
            }
        }
    }
}

/// Passes request bytes through untouched, and reads any answer as
/// nothing (a message's fields are skipped as unknown).
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Default)]
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buffer: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buffer.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buffer: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf as _;
        let remaining = buffer.remaining();
        buffer.advance(remaining);
        Ok(Some(()))
    }
}

/// Sends `body` to `method` as `identity`; the status the server refused
/// it with, if it did.
async fn call(
    mesh: &TestMesh,
    url: &str,
    identity: &Identity,
    method: &Method,
    body: Vec<u8>,
) -> Result<(), tonic::Status> {
    let (channel, attach) = mesh.channel_as(url, identity);
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(error) = grpc.ready().await {
        panic!("{url} does not take calls: {error}");
    }
    let path = http::uri::PathAndQuery::try_from(method.path.as_str()).unwrap();
    let mut interceptor = attach;
    let metadata = tonic::service::Interceptor::call(&mut interceptor, tonic::Request::new(()))
        .unwrap()
        .metadata()
        .clone();
    fn request<T>(metadata: &tonic::metadata::MetadataMap, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = metadata.clone();
        request.set_timeout(Duration::from_secs(10));
        request
    }
    match (method.client_streaming, method.server_streaming) {
        (false, false) => grpc
            .unary(request(&metadata, body), path, RawCodec)
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(request(&metadata, body), path, RawCodec)
            .await
            .map(drop),
        (true, _) => {
            let stream = tokio_stream::once(body);
            match grpc
                .streaming(request(&metadata, stream), path, RawCodec)
                .await
            {
                // A stream that goes on is a call accepted; one that ends
                // at once says how.
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                        Ok(Err(status)) => Err(status),
                        _ => Ok(()),
                    }
                }
                Err(status) => Err(status),
            }
        }
    }
}

fn precise(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::Aborted
    )
}

#[tokio::test]
async fn no_request_breaks_a_server_or_gets_an_imprecise_status() {
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    let set = FileDescriptorSet::decode(fedmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut runner = TestRunner::default();
    for method in methods(&set) {
        let (url, identity) = if method.path.contains(".Directory/") {
            (mesh.coordinator_url(), Identity::Operator("test".into()))
        } else if method.path.contains(".Notifications/") {
            (mesh.notifier_url(), Identity::Agency("tax-office".into()))
        } else if method.path.contains(".Relay/") {
            (mesh.gateway_url("east"), Identity::Gateway("west".into()))
        } else {
            (
                mesh.gateway_url("east"),
                Identity::Agency("tax-office".into()),
            )
        };
        for case in 0..CASES * 2 {
            let body = if case % 2 == 0 {
                draw(&mut runner, prop::collection::vec(any::<u8>(), 0..512))
            } else {
                let mut body = Vec::new();
                encode_arbitrary(&mut runner, &set, &method.input, 0, &mut body);
                body
            };
            let shown = body.clone();
            let answered = within(
                &format!("{} to answer", method.path),
                call(&mesh, &url, &identity, &method, body),
            )
            .await;
            let Err(status) = answered else {
                continue;
            };
            assert!(
                precise(&status),
                "{} answered {:?} {:?} to {:02x?}",
                method.path,
                status.code(),
                status.message(),
                &shown[..shown.len().min(256)]
            );
        }
    }
    // Every server still serves.
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["land-registry"]).await;
    mesh.send("east", "tax-office", "land-registry", "still here", None)
        .await
        .expect("the mesh still serves");
}
