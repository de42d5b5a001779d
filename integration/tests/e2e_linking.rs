//! End-to-end tests of span linking: a request that crosses several traced processes on this host
//! must become one trace whose spans chain client → server → client → server. Inside a process,
//! the calls a server makes while serving a request are children of that request's SERVER span;
//! across processes, a SERVER span is the child of the CLIENT span at the other end of its
//! connection; a W3C `traceparent` sent by the first client puts the whole chain into its trace.
//!
//! The chains are real: curl → nginx (reverse proxy, keep-alive upstream, two workers) → a python
//! threading server, and a python client → python service A → python service B. Every test runs
//! the agent with `--port` for each port of its chain, so all spans received belong to its
//! requests, and gives each request its own path so the spans of one request can be told apart.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use integration::{AttrValue, OtlpReceiver, ReceivedSpan, SpanKind, StatusCode};

/// `e2e_service_a.py PORT BACKEND_PORT`: answers `GET /a/<i>` with the body of its own
/// `GET /b/<i>` to 127.0.0.1:BACKEND_PORT, made on a new connection from the serving thread.
const SERVICE_A_PY: &str = r#"
import http.client, http.server, sys

port, backend = int(sys.argv[1]), int(sys.argv[2])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=10)
        conn.request("GET", "/b/" + self.path[len("/a/"):])
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        self.send_response(resp.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// `e2e_chain_client.py PORT TOTAL THREADS`: THREADS threads share `GET /a/0..TOTAL`, each request
/// on its own connection, and expect B's answer `path=/b/<i>`; exits non-zero on any failure.
const CHAIN_CLIENT_PY: &str = r#"
import http.client, queue, sys, threading

port, total, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
todo = queue.Queue()
for i in range(total):
    todo.put(i)
failures = []
start = threading.Barrier(threads)

def work():
    start.wait()
    while True:
        try:
            i = todo.get_nowait()
        except queue.Empty:
            return
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/a/%d" % i)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or body != ("path=/b/%d" % i).encode():
                failures.append("/a/%d: %d %r" % (i, resp.status, body))
        except Exception as e:
            failures.append("/a/%d: %r" % (i, e))
        finally:
            conn.close()

workers = [threading.Thread(target=work) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
if failures:
    sys.exit("\n".join(failures))
"#;

/// Which process the spans of a hop must come from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// This process.
    Pid(u32),
    /// A child of this process, such as an nginx worker.
    WorkerOf(u32),
    /// The process that sent the request ([`Request::client_pid`]), such as one curl run.
    RequestClient,
}

/// One span each request produces on its way down the chain.
struct Hop {
    /// Name in reports, e.g. `nginx SERVER`.
    label: &'static str,
    kind: SpanKind,
    /// Server port of the connection the span is on (`network.local.port` of a SERVER span,
    /// `network.peer.port` of a CLIENT span).
    port: u16,
    /// The request's path on this hop is `<prefix><request index>`.
    prefix: &'static str,
    origin: Origin,
    /// An earlier hop whose span, in every request, comes from the same process as this one's.
    same_process_as: Option<usize>,
}

/// One end-user request sent into the chain.
struct Request {
    index: u32,
    /// Pid of the process that sent it, for [`Origin::RequestClient`].
    client_pid: Option<u32>,
    /// `(trace id, parent span id)` of the `traceparent` the request was sent with.
    context: Option<(String, String)>,
}

/// How well the received spans link into one chain per request.
struct Linking {
    requests: usize,
    /// Requests whose spans form exactly the expected chain in one trace.
    complete: usize,
    /// Spans whose parent is not the one expected: a span of another request, of the wrong hop,
    /// another request's `traceparent` parent, or an id no span of the test has.
    wrong_parents: usize,
    /// Spans left as roots, or under their request's `traceparent` parent, where a span of the
    /// chain was expected: allowed for ambiguous cases, unlike a wrong parent.
    unlinked: usize,
    /// A summary line, then one line per problem.
    report: String,
}

/// The request path a span carries: `url.path` on the server side, the path of `url.full` on the
/// client side.
fn span_path(span: &ReceivedSpan) -> Option<&str> {
    if span.kind == SpanKind::Server {
        return span.attr_str("url.path");
    }
    let full = span.attr_str("url.full")?;
    let after_scheme = &full[full.find("://")? + 3..];
    let path = &after_scheme[after_scheme.find('/')?..];
    Some(path.split_once('?').map_or(path, |(p, _)| p))
}

/// The server port of the connection `span` is on.
fn span_port(span: &ReceivedSpan) -> Option<i64> {
    match span.kind {
        SpanKind::Server => span.attr_int("network.local.port"),
        _ => span.attr_int("network.peer.port"),
    }
}

/// Every span with its ids, then [`describe`].
fn listing(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "trace={} span={} parent={} {}",
                s.trace_id,
                s.span_id,
                s.parent_span_id.as_deref().unwrap_or("-"),
                describe(s)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails the test for a problem of the harness (a span missing, unexpected or from the wrong
/// process), as opposed to a linking problem, which [`check_chains`] counts.
fn harness_failure(what: &str, spans: &[ReceivedSpan], agent: &Agent) -> ! {
    panic!(
        "{what}\nall spans:\n{}\nagent stderr:\n{}",
        describe_all(spans),
        agent.stderr()
    )
}

/// Groups `spans` into one span per hop of `chain` per request and checks that each request's
/// spans chain exactly: hop 0's parent is the request's `traceparent` parent (none without one),
/// every later hop's parent is the previous hop's span, and all share one trace id (the
/// `traceparent`'s if any). `Err` says why the spans are not exactly one per hop and request from
/// the expected processes, a failure of the harness rather than of linking.
fn check_chains(
    spans: &[ReceivedSpan],
    chain: &[Hop],
    requests: &[Request],
) -> Result<Linking, String> {
    let by_index: HashMap<u32, &Request> = requests.iter().map(|r| (r.index, r)).collect();
    let mut slots: BTreeMap<(u32, usize), &ReceivedSpan> = BTreeMap::new();
    for span in spans {
        let port = span_port(span);
        let hop = chain
            .iter()
            .position(|h| h.kind == span.kind && port == Some(i64::from(h.port)))
            .ok_or_else(|| format!("span on no hop of the chain: {}", describe(span)))?;
        let index = span_path(span)
            .and_then(|p| p.strip_prefix(chain[hop].prefix))
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| by_index.contains_key(i))
            .ok_or_else(|| {
                format!(
                    "{} span of no request of the test: {}",
                    chain[hop].label,
                    describe(span)
                )
            })?;
        if slots.insert((index, hop), span).is_some() {
            return Err(format!(
                "two {} spans for {}{index}",
                chain[hop].label, chain[hop].prefix
            ));
        }
    }

    let span_ids: HashMap<&str, (u32, usize)> = slots
        .iter()
        .map(|(&key, span)| (span.span_id.as_str(), key))
        .collect();
    let context_ids: HashMap<&str, u32> = requests
        .iter()
        .filter_map(|r| Some((r.context.as_ref()?.1.as_str(), r.index)))
        .collect();
    let mut linking = Linking {
        requests: requests.len(),
        complete: 0,
        wrong_parents: 0,
        unlinked: 0,
        report: String::new(),
    };
    let mut problems = String::new();
    for request in requests {
        let i = request.index;
        let hops = (0..chain.len())
            .map(|hop| {
                slots.get(&(i, hop)).copied().ok_or_else(|| {
                    format!("no {} span for {}{i}", chain[hop].label, chain[hop].prefix)
                })
            })
            .collect::<Result<Vec<&ReceivedSpan>, String>>()?;
        for (hop, span) in chain.iter().zip(&hops) {
            let pid = span
                .resource_int("process.pid")
                .and_then(|p| u32::try_from(p).ok());
            let right_process = match (hop.origin, pid) {
                (Origin::Pid(want), Some(pid)) => pid == want,
                (Origin::WorkerOf(parent), Some(pid)) => parent_pid(pid) == parent,
                (Origin::RequestClient, Some(pid)) => Some(pid) == request.client_pid,
                (_, None) => false,
            };
            let same_as_earlier = hop.same_process_as.is_none_or(|earlier| {
                hops[earlier].resource_int("process.pid") == span.resource_int("process.pid")
            });
            if !right_process || !same_as_earlier {
                return Err(format!(
                    "{} span of request {i} from the wrong process ({:?} expected): {}",
                    hop.label,
                    hop.origin,
                    describe(span)
                ));
            }
        }

        let name = |hop: usize| format!("{} {}{i}", chain[hop].label, chain[hop].prefix);
        let mut complete = true;
        let want_trace = request
            .context
            .as_ref()
            .map_or(hops[0].trace_id.as_str(), |(trace, _)| trace.as_str());
        for (hop, span) in hops.iter().enumerate() {
            let want_parent = match hop {
                0 => request.context.as_ref().map(|(_, parent)| parent.as_str()),
                _ => Some(hops[hop - 1].span_id.as_str()),
            };
            let want_name = match hop {
                0 if want_parent.is_some() => "the traceparent's parent".to_owned(),
                0 => "none".to_owned(),
                _ => name(hop - 1),
            };
            let own_context = request.context.as_ref().map(|(_, p)| p.as_str());
            match span.parent_span_id.as_deref() {
                got if got == want_parent => {}
                None => {
                    linking.unlinked += 1;
                    complete = false;
                    let _ = writeln!(
                        problems,
                        "unlinked: {} is a root; want parent {} ({want_name})",
                        name(hop),
                        want_parent.unwrap_or("none")
                    );
                }
                // The request's own context is an ancestor of every span of the chain: a span
                // left under it is unlinked, not misplaced.
                got if got == own_context => {
                    linking.unlinked += 1;
                    complete = false;
                    let _ = writeln!(
                        problems,
                        "unlinked: {} is left under the traceparent's parent; want parent {} \
                         ({want_name})",
                        name(hop),
                        want_parent.unwrap_or("none")
                    );
                }
                Some(got) => {
                    linking.wrong_parents += 1;
                    complete = false;
                    let target = match (span_ids.get(got), context_ids.get(got)) {
                        (Some(&(j, h)), _) => format!("{} {}{j}", chain[h].label, chain[h].prefix),
                        (None, Some(j)) => format!("the traceparent's parent of request {j}"),
                        (None, None) => "no span of the test".to_owned(),
                    };
                    let _ = writeln!(
                        problems,
                        "WRONG PARENT: {} has parent {got} ({target}); want {} ({want_name})",
                        name(hop),
                        want_parent.unwrap_or("none")
                    );
                }
            }
            // A span without its parent is in a trace of its own; only a linked span's trace
            // says something more.
            if span.parent_span_id.is_some() && span.trace_id != want_trace {
                complete = false;
                let _ = writeln!(
                    problems,
                    "trace: {} is in trace {}; want {want_trace}",
                    name(hop),
                    span.trace_id
                );
            }
        }
        linking.complete += usize::from(complete);
    }
    let rate = percent(linking.complete, linking.requests);
    linking.report = format!(
        "{}/{} requests chain completely ({rate:.1}%); {} spans with a wrong parent; {} unlinked \
         spans\n{problems}",
        linking.complete, linking.requests, linking.wrong_parents, linking.unlinked
    );
    Ok(linking)
}

/// `part` of `whole` in percent.
fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    part as f64 * 100.0 / whole as f64
}

/// Prints the linking summary of `test` and asserts that no span has a wrong parent and that at
/// least `min_percent` of the requests chain completely.
fn assert_linking(
    test: &str,
    linking: &Linking,
    min_percent: usize,
    spans: &[ReceivedSpan],
    agent: &Agent,
) {
    eprintln!(
        "{test}: complete-and-correct {}/{} ({:.1}%), wrong parents {}, unlinked {}",
        linking.complete,
        linking.requests,
        percent(linking.complete, linking.requests),
        linking.wrong_parents,
        linking.unlinked
    );
    let ok = linking.wrong_parents == 0 && linking.complete * 100 >= min_percent * linking.requests;
    assert!(
        ok,
        "{test}: want 0 wrong parents and at least {min_percent}% complete chains; {}\nall spans:\n{}\nagent stderr:\n{}",
        linking.report,
        listing(spans),
        agent.stderr()
    );
}

/// Starts the agent exporting over gRPC to `receiver`, tracing only connections on `ports`.
fn start_agent(dir: &TempDir, receiver: &OtlpReceiver, ports: &[u16]) -> Agent {
    let mut args = Agent::otlp_args(receiver);
    for port in ports {
        args.extend(["--port".to_owned(), port.to_string()]);
    }
    Agent::start(dir, &args)
}

/// curl → nginx (two workers, keep-alive upstream) → [`SERVER_PY`], each listening on its own
/// port; stopped on drop.
struct NginxChain {
    dir: TempDir,
    nginx_port: u16,
    backend_port: u16,
    nginx: Proc,
    backend: Proc,
}

impl NginxChain {
    fn start(tag: &str) -> NginxChain {
        let dir = TempDir::new(tag);
        let backend_port = free_port();
        let backend = start_script_server(&dir, backend_port);
        let nginx_port = free_port();
        // The upstream keeps connections open, so requests of different clients share
        // nginx → backend connections.
        let nginx = start_nginx(
            &dir,
            nginx_port,
            2,
            &format!(
                "    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}"
            ),
        );
        NginxChain {
            dir,
            nginx_port,
            backend_port,
            nginx,
            backend,
        }
    }

    /// curl CLIENT → nginx SERVER → nginx CLIENT → python SERVER, all for `/chain/<i>` (nginx
    /// forwards the path unchanged).
    fn hops(&self) -> Vec<Hop> {
        let hop = |label, kind, port, origin, same_process_as| Hop {
            label,
            kind,
            port,
            prefix: "/chain/",
            origin,
            same_process_as,
        };
        let nginx = Origin::WorkerOf(self.nginx.pid());
        vec![
            hop(
                "curl CLIENT",
                SpanKind::Client,
                self.nginx_port,
                Origin::RequestClient,
                None,
            ),
            hop(
                "nginx SERVER",
                SpanKind::Server,
                self.nginx_port,
                nginx,
                None,
            ),
            hop(
                "nginx CLIENT",
                SpanKind::Client,
                self.backend_port,
                nginx,
                Some(1),
            ),
            hop(
                "python SERVER",
                SpanKind::Server,
                self.backend_port,
                Origin::Pid(self.backend.pid()),
                None,
            ),
        ]
    }

    /// Sends `GET /chain/0..total` with one curl process per request, `clients` at a time;
    /// `context(i)` is the `traceparent` of request `i`, if any.
    fn send(
        &self,
        total: u32,
        clients: u32,
        context: impl Fn(u32) -> Option<(String, String)> + Sync,
    ) -> Vec<Request> {
        let next = AtomicU32::new(0);
        let mut requests: Vec<Request> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..clients)
                .map(|_| {
                    scope.spawn(|| {
                        let mut sent = Vec::new();
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= total {
                                return sent;
                            }
                            let ctx = context(index);
                            let path = format!("/chain/{index}");
                            let url = format!("http://127.0.0.1:{}{path}", self.nginx_port);
                            let header = ctx.as_ref().map(|(trace, parent)| {
                                format!("traceparent: 00-{trace}-{parent}-01")
                            });
                            let mut args = Vec::new();
                            if let Some(h) = &header {
                                args.extend(["-H", h.as_str()]);
                            }
                            args.push(&url);
                            let run = curl(&args);
                            assert_eq!(run.status, 200, "GET {path} through nginx");
                            assert_eq!(
                                run.body_bytes,
                                i64::try_from(format!("path={path}").len()).expect("len"),
                                "body of GET {path}: the backend's answer"
                            );
                            sent.push(Request {
                                index,
                                client_pid: Some(run.pid),
                                context: ctx,
                            });
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("curl thread"))
                .collect()
        });
        requests.sort_by_key(|r| r.index);
        assert_eq!(requests.len(), usize::try_from(total).expect("count"));
        requests
    }
}

/// Runs `total` requests, `clients` at a time, through a fresh nginx chain and checks the links.
async fn nginx_chain(
    test: &str,
    total: u32,
    clients: u32,
    min_percent: usize,
    context: impl Fn(u32) -> Option<(String, String)> + Sync,
) {
    require_root();
    let chain = NginxChain::start(test);
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let mut agent = start_agent(
        &chain.dir,
        &receiver,
        &[chain.nginx_port, chain.backend_port],
    );
    let requests = chain.send(total, clients, context);
    // Two SERVER and two CLIENT spans per request, and nothing else.
    let n = requests.len() * 2;
    let spans = collect_exact(&receiver, &mut agent, n, n).await;
    let linking = check_chains(&spans, &chain.hops(), &requests)
        .unwrap_or_else(|e| harness_failure(&e, &spans, &agent));
    assert_linking(test, &linking, min_percent, &spans, &agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxy_chain_sequential() {
    // One request at a time leaves nothing ambiguous: every request must chain.
    nginx_chain("nginx_proxy_chain_sequential", 20, 1, 100, |_| None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxy_chain_concurrent() {
    // With 8 requests in flight an event-loop worker may serve several requests at once; the
    // linker may leave a request it cannot attribute unambiguously as roots (counted, never given
    // a wrong parent), so up to 5% of the chains may be incomplete, but no parent may be wrong.
    nginx_chain("nginx_proxy_chain_concurrent", 64, 8, 95, |_| None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_joins_whole_chain() {
    // A distinct trace per request, so a span joined to the wrong request's context shows.
    nginx_chain("traceparent_joins_whole_chain", 4, 1, 100, |i| {
        Some((
            format!(
                "{:032x}",
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700_u128 + u128::from(i)
            ),
            format!("{:016x}", 0x00f0_67aa_0ba9_0200_u64 + u64::from(i)),
        ))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threading_server_calls_second_service() {
    require_root();
    const REQUESTS: u32 = 80;
    const CLIENTS: u32 = 16;
    let dir = TempDir::new("threading-chain");
    let receiver = OtlpReceiver::start_grpc()
        .await
        .expect("start the OTLP receiver");
    let b_port = free_port();
    let b = start_script_server(&dir, b_port);
    let a_port = free_port();
    let script = dir.write("e2e_service_a.py", SERVICE_A_PY);
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args([a_port.to_string(), b_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut a = Proc::spawn("e2e_service_a.py", cmd);
    wait_for_port(&mut a, a_port);
    let mut agent = start_agent(&dir, &receiver, &[a_port, b_port]);

    let script = dir.write("e2e_chain_client.py", CHAIN_CLIENT_PY);
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args([
            a_port.to_string(),
            REQUESTS.to_string(),
            CLIENTS.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut client = Proc::spawn("e2e_chain_client.py", cmd);
    let status = client.wait(WAIT);
    assert!(status.success(), "e2e_chain_client.py failed: {status}");

    let n = usize::try_from(REQUESTS).expect("count") * 2;
    let spans = collect_exact(&receiver, &mut agent, n, n).await;
    let hops = [
        Hop {
            label: "client CLIENT",
            kind: SpanKind::Client,
            port: a_port,
            prefix: "/a/",
            origin: Origin::Pid(client.pid()),
            same_process_as: None,
        },
        Hop {
            label: "A SERVER",
            kind: SpanKind::Server,
            port: a_port,
            prefix: "/a/",
            origin: Origin::Pid(a.pid()),
            same_process_as: None,
        },
        Hop {
            label: "A CLIENT",
            kind: SpanKind::Client,
            port: b_port,
            prefix: "/b/",
            origin: Origin::Pid(a.pid()),
            same_process_as: None,
        },
        Hop {
            label: "B SERVER",
            kind: SpanKind::Server,
            port: b_port,
            prefix: "/b/",
            origin: Origin::Pid(b.pid()),
            same_process_as: None,
        },
    ];
    let requests: Vec<Request> = (0..REQUESTS)
        .map(|index| Request {
            index,
            client_pid: None,
            context: None,
        })
        .collect();
    let linking = check_chains(&spans, &hops, &requests)
        .unwrap_or_else(|e| harness_failure(&e, &spans, &agent));
    // A thread-per-request server is never ambiguous: every request must chain.
    assert_linking(
        "threading_server_calls_second_service",
        &linking,
        100,
        &spans,
        &agent,
    );
}

/// A made-up span of hop `hop` (of [`checker_hops`]) for request `i`.
fn made_up_span(hop: usize, i: u32, trace: &str, parent: Option<&str>) -> ReceivedSpan {
    let (kind, pid, port) = [
        (SpanKind::Client, 10, 1),
        (SpanKind::Server, 20, 1),
        (SpanKind::Client, 20, 2),
        (SpanKind::Server, 30, 2),
    ][hop];
    let (port_key, path_key, path) = match kind {
        SpanKind::Server => ("network.local.port", "url.path", format!("/r/{i}")),
        _ => ("network.peer.port", "url.full", format!("http://h/r/{i}?q")),
    };
    ReceivedSpan {
        resource: BTreeMap::from([("process.pid".to_owned(), AttrValue::Int(pid))]),
        scope_name: String::new(),
        scope_version: String::new(),
        trace_id: trace.to_owned(),
        span_id: made_up_id(hop, i),
        parent_span_id: parent.map(str::to_owned),
        trace_state: String::new(),
        name: "GET".to_owned(),
        kind,
        start_unix_ns: 0,
        end_unix_ns: 0,
        attributes: BTreeMap::from([
            (port_key.to_owned(), AttrValue::Int(port)),
            (path_key.to_owned(), AttrValue::Str(path)),
        ]),
        status_code: StatusCode::Unset,
        status_message: String::new(),
    }
}

/// Span id of [`made_up_span`] `(hop, i)`.
fn made_up_id(hop: usize, i: u32) -> String {
    format!(
        "{:016x}",
        u64::from(i) * 16 + u64::try_from(hop).expect("hop") + 1
    )
}

/// A client (pid 10) → server (pid 20) → its call (pid 20) → server (pid 30) chain on `/r/<i>`.
fn checker_hops() -> Vec<Hop> {
    [
        ("client", SpanKind::Client, 1, 10, None),
        ("front SERVER", SpanKind::Server, 1, 20, None),
        ("front CLIENT", SpanKind::Client, 2, 20, Some(1)),
        ("back SERVER", SpanKind::Server, 2, 30, None),
    ]
    .into_iter()
    .map(|(label, kind, port, pid, same_process_as)| Hop {
        label,
        kind,
        port,
        prefix: "/r/",
        origin: Origin::Pid(pid),
        same_process_as,
    })
    .collect()
}

/// The checker on made-up spans: it must tell complete chains from unlinked spans, wrong parents
/// and split traces, or the end-to-end tests above would prove nothing.
#[test]
fn checker_counts_complete_unlinked_and_wrong_chains() {
    // Requests 3, 6 and 7 carry a traceparent, each its own.
    let requests: Vec<Request> = (0..8)
        .map(|index| Request {
            index,
            client_pid: None,
            context: [3, 6, 7].contains(&index).then(|| {
                (
                    format!("4bf92f3577b34da6a3ce929d0e0e47{index:02x}"),
                    format!("00f067aa0ba902{index:02x}"),
                )
            }),
        })
        .collect();
    let mut spans = Vec::new();
    for request in &requests {
        let i = request.index;
        let trace = request
            .context
            .as_ref()
            .map_or_else(|| format!("{:032x}", i + 1), |(t, _)| t.clone());
        for hop in 0..4 {
            let mut parent = match hop {
                0 => request.context.as_ref().map(|(_, p)| p.clone()),
                _ => Some(made_up_id(hop - 1, i)),
            };
            let mut span_trace = trace.clone();
            match (i, hop) {
                // Left a root: allowed, counted.
                (1, 3) => parent = None,
                // The parent belongs to another request.
                (2, 2) => parent = Some(made_up_id(1, 0)),
                // The parent is the request's own span of the wrong hop.
                (4, 2) => parent = Some(made_up_id(0, 4)),
                // The right parent in another trace.
                (5, 3) => span_trace = "f".repeat(32),
                // Left under the request's own context: allowed, counted.
                (6, 1) => parent = requests[6].context.as_ref().map(|(_, p)| p.clone()),
                // Under another request's context.
                (7, 3) => parent = requests[3].context.as_ref().map(|(_, p)| p.clone()),
                _ => {}
            }
            spans.push(made_up_span(hop, i, &span_trace, parent.as_deref()));
        }
    }

    let linking = check_chains(&spans, &checker_hops(), &requests).expect("one span per hop");
    assert_eq!(
        (
            linking.requests,
            linking.complete,
            linking.wrong_parents,
            linking.unlinked
        ),
        (8, 2, 3, 2),
        "{}",
        linking.report
    );
    assert!(
        linking.report.contains(
            "WRONG PARENT: front CLIENT /r/2 has parent 0000000000000002 (front SERVER /r/0)"
        ),
        "{}",
        linking.report
    );

    // A missing span, a duplicate and a span from the wrong process are harness failures.
    let harness_error = |spans: &[ReceivedSpan]| {
        check_chains(spans, &checker_hops(), &requests)
            .err()
            .unwrap_or_default()
    };
    assert!(harness_error(&spans[1..]).starts_with("no client span for /r/0"));
    let mut twice = spans.clone();
    twice.push(spans[0].clone());
    assert!(harness_error(&twice).starts_with("two client spans for /r/0"));
    let mut moved = spans.clone();
    moved[2].resource = spans[3].resource.clone();
    assert!(
        harness_error(&moved).starts_with("front CLIENT span of request 0 from the wrong process")
    );
}
