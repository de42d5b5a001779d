//! The agent's former struct-based OTLP conversion, kept for tests as the reference the direct encoder
//! must match: it builds `opentelemetry-proto` prost structs, which prost then encodes.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue as ProtoKeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span as ProtoSpan, Status as ProtoStatus,
};

use crate::span::{KeyValue, Resource, Span, SpanKind, Status, Value, ValueRef};

/// Instrumentation scope name on every exported span.
const SCOPE_NAME: &str = "tracer";

/// Builds one request with a ResourceSpans per distinct (service.name, pid), in order of first appearance.
pub(crate) fn build_request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    let mut groups: Vec<(String, u32, ResourceSpans)> = Vec::new();
    for span in spans {
        let res = &span.resource;
        let idx = match groups
            .iter()
            .position(|(name, pid, _)| *pid == res.pid && *name == res.service_name)
        {
            Some(i) => i,
            None => {
                groups.push((res.service_name.clone(), res.pid, new_resource_spans(res)));
                groups.len() - 1
            }
        };
        // Every group is created with exactly one ScopeSpans.
        if let Some(scope) = groups[idx].2.scope_spans.first_mut() {
            scope.spans.push(convert_span(span));
        }
    }
    ExportTraceServiceRequest {
        resource_spans: groups.into_iter().map(|(_, _, rs)| rs).collect(),
    }
}

fn new_resource_spans(res: &Resource) -> ResourceSpans {
    let mut attributes: Vec<ProtoKeyValue> = res.attributes.iter().map(convert_kv).collect();
    // The grouping key must be visible to the backend even if the resource builder left it out.
    if !res.attributes.iter().any(|kv| kv.key == "service.name") {
        attributes.push(kv(
            "service.name",
            any_value::Value::StringValue(res.service_name.clone()),
        ));
    }
    if !res.attributes.iter().any(|kv| kv.key == "process.pid") {
        attributes.push(kv(
            "process.pid",
            any_value::Value::IntValue(i64::from(res.pid)),
        ));
    }
    ResourceSpans {
        resource: Some(ProtoResource {
            attributes,
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: SCOPE_NAME.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            }),
            spans: Vec::new(),
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

fn convert_span(span: Span) -> ProtoSpan {
    let kind = match span.kind {
        SpanKind::Server => ProtoKind::Server,
        SpanKind::Client => ProtoKind::Client,
    };
    let status = match span.status {
        Status::Unset => None,
        Status::Error(msg) => Some(ProtoStatus {
            code: StatusCode::Error as i32,
            message: msg.unwrap_or_default(),
        }),
    };
    ProtoSpan {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        parent_span_id: span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        trace_state: span.trace_state,
        name: span.name.into(),
        kind: kind as i32,
        start_time_unix_nano: span.start_unix_ns,
        end_time_unix_nano: span.end_unix_ns,
        attributes: span
            .attributes
            .iter()
            .map(|(key, value)| convert_ref(key, value))
            .collect(),
        status,
        ..Default::default()
    }
}

fn convert_ref(key: &str, value: ValueRef<'_>) -> ProtoKeyValue {
    let value = match value {
        ValueRef::Str(s) => any_value::Value::StringValue(s.to_string()),
        ValueRef::Int(i) => any_value::Value::IntValue(i),
        ValueRef::Bool(b) => any_value::Value::BoolValue(b),
    };
    kv(key, value)
}

fn convert_kv(attr: &KeyValue) -> ProtoKeyValue {
    let value = match &attr.value {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
    };
    kv(attr.key, value)
}

fn kv(key: &str, value: any_value::Value) -> ProtoKeyValue {
    ProtoKeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}
