//! Conversion of the agent's spans into one OTLP `ExportTraceServiceRequest` per batch.

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

use crate::span::{KeyValue, Resource, Span, SpanKind, Status, Value};

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
        name: span.name,
        kind: kind as i32,
        start_time_unix_nano: span.start_unix_ns,
        end_time_unix_nano: span.end_unix_ns,
        attributes: span.attributes.iter().map(convert_kv).collect(),
        status,
        ..Default::default()
    }
}

fn convert_kv(attr: &KeyValue) -> ProtoKeyValue {
    let value = match &attr.value {
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A resource with the attributes the resource builder would set.
    pub(crate) fn resource(service: &str, pid: u32) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: service.to_string(),
            pid,
            attributes: vec![
                KeyValue::str("service.name", service),
                KeyValue::int("process.pid", i64::from(pid)),
            ],
        })
    }

    /// A server span with distinct ids derived from `n`.
    pub(crate) fn span(n: u8, resource: &Arc<Resource>) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n.wrapping_add(1); 8],
            parent_span_id: None,
            trace_state: String::new(),
            name: format!("GET /item/{n}"),
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000 + u64::from(n),
            end_unix_ns: 1_700_000_000_012_345_678 + u64::from(n),
            attributes: vec![
                KeyValue::str("http.request.method", "GET"),
                KeyValue::int("http.response.status_code", 200),
            ],
            status: Status::Unset,
            resource: Arc::clone(resource),
        }
    }

    fn value_of<'a>(attrs: &'a [ProtoKeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn span_fields_convert() {
        let res = resource("checkout", 42);
        let mut s = span(7, &res);
        s.kind = SpanKind::Client;
        s.parent_span_id = Some([9; 8]);
        s.trace_state = "vendor=abc".to_string();
        s.status = Status::Error(Some("connection reset".to_string()));
        s.attributes.push(KeyValue {
            key: "flag",
            value: Value::Bool(true),
        });
        let req = build_request(vec![s.clone()]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(out.trace_id, s.trace_id.to_vec());
        assert_eq!(out.span_id, s.span_id.to_vec());
        assert_eq!(out.parent_span_id, vec![9; 8]);
        assert_eq!(out.trace_state, "vendor=abc");
        assert_eq!(out.name, "GET /item/7");
        assert_eq!(out.kind, ProtoKind::Client as i32);
        assert_eq!(out.start_time_unix_nano, s.start_unix_ns);
        assert_eq!(out.end_time_unix_nano, s.end_unix_ns);
        let status = out.status.as_ref().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "connection reset");
        assert_eq!(
            value_of(&out.attributes, "http.request.method"),
            Some(&any_value::Value::StringValue("GET".into()))
        );
        assert_eq!(
            value_of(&out.attributes, "http.response.status_code"),
            Some(&any_value::Value::IntValue(200))
        );
        assert_eq!(
            value_of(&out.attributes, "flag"),
            Some(&any_value::Value::BoolValue(true))
        );
    }

    #[test]
    fn unset_status_and_root_span() {
        let res = resource("a", 1);
        let req = build_request(vec![span(1, &res)]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert!(out.parent_span_id.is_empty());
        assert_eq!(out.status, None);
        assert_eq!(out.kind, ProtoKind::Server as i32);
    }

    #[test]
    fn spans_group_per_resource() {
        let a = resource("a", 1);
        let a_other_pid = resource("a", 2);
        let b = resource("b", 3);
        let spans = vec![
            span(1, &a),
            span(2, &b),
            span(3, &a_other_pid),
            span(4, &a),
            span(5, &b),
            span(6, &a),
        ];
        let req = build_request(spans);
        assert_eq!(req.resource_spans.len(), 3);
        let summary: Vec<(i64, Vec<String>)> = req
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                let Some(any_value::Value::IntValue(pid)) = value_of(attrs, "process.pid") else {
                    panic!("no pid")
                };
                assert_eq!(rs.scope_spans.len(), 1);
                let scope = rs.scope_spans[0].scope.as_ref().unwrap();
                assert_eq!(scope.name, "tracer");
                assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
                (
                    *pid,
                    rs.scope_spans[0]
                        .spans
                        .iter()
                        .map(|s| s.name.clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    1,
                    vec![
                        "GET /item/1".into(),
                        "GET /item/4".into(),
                        "GET /item/6".into()
                    ]
                ),
                (3, vec!["GET /item/2".into(), "GET /item/5".into()]),
                (2, vec!["GET /item/3".into()]),
            ]
        );
    }

    #[test]
    fn missing_grouping_attributes_are_added() {
        let bare = Arc::new(Resource {
            service_name: "svc".into(),
            pid: 77,
            attributes: Vec::new(),
        });
        let req = build_request(vec![span(1, &bare)]);
        let attrs = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
        assert_eq!(
            value_of(attrs, "service.name"),
            Some(&any_value::Value::StringValue("svc".into()))
        );
        assert_eq!(
            value_of(attrs, "process.pid"),
            Some(&any_value::Value::IntValue(77))
        );
    }
}
