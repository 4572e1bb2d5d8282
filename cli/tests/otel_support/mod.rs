//! An OTLP/HTTP trace collector for the `otel` feature's tests: it keeps every
//! export request and decodes the spans.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// An OTLP/HTTP collector on 127.0.0.1, on a runtime of its own: it keeps every
/// export request's body and answers with an empty export response.
pub struct Collector {
    /// Where it listens.
    pub addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    _rt: tokio::runtime::Runtime,
}

impl Collector {
    /// Start one on a free port.
    pub fn start() -> Collector {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let sink = bodies.clone();
        let addr = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push(body.to_vec());
                        (
                            [("content-type", "application/x-protobuf")],
                            Vec::<u8>::new(),
                        )
                    }
                }),
            );
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            addr
        });
        Collector {
            addr,
            bodies,
            _rt: rt,
        }
    }

    /// Every span received so far, decoded.
    pub fn spans(&self) -> Vec<Span> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|body| ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf"))
            .flat_map(|req| req.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    /// Every export request's body received so far, concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.bodies.lock().unwrap().concat()
    }
}
