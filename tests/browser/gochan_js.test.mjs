// gochan.js's logic under Node's test runner, with a scripted EventSource and
// fetch: batching, handler sets, reconnection (same client, then 401 -> new
// client), update failures, system frames, topic checks. The real-browser
// tests (test_example_page.py, test_gochan_js.py) cover the same client
// against a real gochan; this covers the branches a real server rarely takes.
//
//   node --experimental-detect-module --test tests/browser/gochan_js.test.mjs
//
// (gochan.js is an ES module in a ".js" file outside any package.json, which
// Node before 22 loads only with that flag; test_gochan_js_node.py passes a
// ".mjs" copy in GOCHAN_JS instead, which works on any Node >= 20.)
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";
import { pathToFileURL } from "node:url";

const source = process.env.GOCHAN_JS
  ? pathToFileURL(process.env.GOCHAN_JS)
  : new URL("../../gochan/static/gochan.js", import.meta.url);
const { Gochan, checkTopic } = await import(source.href);

const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

class FakeEventSource extends EventTarget {
  static instances = [];

  constructor(url, init) {
    super();
    this.url = url;
    this.init = init;
    this.readyState = 0;
    this.closed = false;
    FakeEventSource.instances.push(this);
  }

  get query() {
    return new URL(this.url, "http://gochan.test").searchParams;
  }

  close() {
    this.readyState = 2;
    this.closed = true;
  }

  open() {
    this.readyState = 1;
    this.dispatchEvent(new Event("open"));
  }

  frame(type, data, lastEventId = "") {
    this.dispatchEvent(new MessageEvent(type, { data, lastEventId }));
  }

  config(clientId, subscriptions) {
    this.open();
    const config = { client_id: clientId, client_ttl_millis: 60000 };
    this.frame("message", JSON.stringify({ config, subscriptions }));
  }

  /** The end of a stream at a server shutdown: the delay, then Client closed. */
  shutdown(retryMs) {
    this.frame("message", JSON.stringify({ shutdown: { retry_ms: retryMs } }));
    this.frame("message", "Client closed");
  }

  /** Connection lost; readyState 0: the browser retries, 2: it gave up. */
  drop(readyState = 0) {
    this.readyState = readyState;
    this.dispatchEvent(new Event("error"));
  }
}

/** A fetch that answers like gochan, keeping one client's topics. */
function fakeServer() {
  const server = {
    calls: [],
    topics: new Set(),
    headStatus: 200,
    headHeaders: {},
    respond: null, // (call) => Response, to script failures
    async fetch(url, init) {
      const call = { url: String(url), init, body: init.body ? JSON.parse(init.body) : null };
      server.calls.push(call);
      await tick();
      if (server.respond) {
        const scripted = server.respond(call);
        if (scripted) return scripted;
      }
      if (init.method === "HEAD") {
        return new Response(null, { status: server.headStatus, headers: server.headHeaders });
      }
      for (const t of call.body.add) server.topics.add(t);
      for (const t of call.body.remove) server.topics.delete(t);
      const answer = {
        client_id: call.body.client_id,
        subscriptions: [...server.topics],
        errors: [],
      };
      return new Response(JSON.stringify(answer), { status: 200 });
    },
    get updates() {
      return server.calls.filter((c) => c.init.method === "POST").map((c) => c.body);
    },
  };
  return server;
}

let server;
let events;

function client(options = {}) {
  const gc = new Gochan("http://gochan.test", {
    EventSource: FakeEventSource,
    fetch: server.fetch,
    ...options,
  });
  for (const type of [
    "open",
    "config",
    "reconnect",
    "disconnect",
    "error",
    "replay",
    "closed",
    "message",
  ]) {
    gc.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  return gc;
}

const streams = () => FakeEventSource.instances;
const last = () => streams()[streams().length - 1];
const kinds = () => events.map(([type]) => type);

beforeEach(() => {
  FakeEventSource.instances = [];
  server = fakeServer();
  events = [];
});

afterEach(() => {
  delete globalThis.reportError;
  mock.timers.reset();
});

test("the first stream carries the topics; later changes of one task make one update", async () => {
  const gc = client();
  const noop = () => {};
  gc.subscribe("a", noop);
  gc.subscribe("b c", noop);
  assert.equal(streams().length, 0); // batched: nothing yet
  await tick();
  assert.equal(streams().length, 1);
  assert.deepEqual(last().query.getAll("topic"), ["a", "b c"]);
  assert.equal(last().query.get("id"), null);
  assert.deepEqual(last().init, { withCredentials: false });
  server.topics = new Set(["a", "b c"]);
  last().config("c1", ["a", "b c"]);
  assert.equal(gc.clientId, "c1");
  assert.equal(gc.connected, true);

  gc.subscribe("d", noop);
  gc.subscribe("e", noop);
  gc.unsubscribe("a", noop);
  await gc.flush();
  assert.deepEqual(server.updates, [{ client_id: "c1", add: ["d", "e"], remove: ["a"] }]);
  assert.deepEqual(gc.subscriptions.sort(), ["b c", "d", "e"]);
  await gc.flush(); // nothing left to send
  assert.equal(server.updates.length, 1);
  assert.deepEqual(kinds(), ["open", "config"]);
});

test("several handlers per topic: the first adds it, the last removes it", async () => {
  const gc = client();
  const got = [];
  const one = (data, info) => got.push(["one", data, info.topic, info.id, info.event.type]);
  const two = (data) => got.push(["two", data]);
  gc.subscribe("t", one);
  const offTwo = gc.subscribe("t", two);
  await tick();
  server.topics = new Set(["t"]);
  last().config("c1", ["t"]);
  last().frame("t", "hello\nworld", "e-1");
  assert.deepEqual(got, [
    ["one", "hello\nworld", "t", "e-1", "t"],
    ["two", "hello\nworld"],
  ]);
  assert.equal(gc.lastEventId, "e-1");
  offTwo();
  await gc.flush();
  assert.deepEqual(server.updates, []); // "t" still has a handler
  gc.unsubscribe("t", one);
  last().frame("t", "late", "e-2"); // sent before the server applied the removal
  assert.equal(got.length, 2);
  await gc.flush();
  assert.deepEqual(server.updates, [{ client_id: "c1", add: [], remove: ["t"] }]);
});

test("a dropped first stream reconnects as the same client, then re-applies changes", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  const first = last();
  first.config("c1", ["a"]);
  first.frame("a", "x", "e-7");
  first.drop(0);
  assert.ok(first.closed, "the stream without an id is replaced");
  const second = last();
  assert.equal(second.query.get("id"), "c1");
  assert.equal(second.query.get("last_event_id"), "e-7");
  assert.equal(second.query.get("topic"), null);
  gc.subscribe("b", () => {}); // wanted while disconnected
  await tick();
  assert.equal(server.updates.length, 0); // waits for the config frame
  server.topics = new Set(["a"]);
  second.config("c1", ["a"]);
  await gc.flush();
  assert.deepEqual(server.updates, [{ client_id: "c1", add: ["b"], remove: [] }]);
  const reconnect = events.find(([type]) => type === "reconnect")[1];
  assert.deepEqual(reconnect, { clientId: "c1", previousClientId: "c1", sameClient: true });
  assert.deepEqual(events.find(([type]) => type === "disconnect")[1], { clientId: "c1" });

  // Later drops of a stream that names the client are the browser's to retry.
  second.drop(0);
  assert.equal(streams().length, 2);
  assert.equal(second.closed, false);
});

test("when the server forgot the client (401), a new client gets the wanted topics", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  gc.subscribe("b", () => {});
  await tick();
  last().config("c1", ["a", "b"]);
  last().frame("a", "x", "e-1");
  last().drop(0);
  const withId = last();
  server.headStatus = 401;
  withId.drop(2); // the browser gave up: an error status
  await tick(5);
  const head = server.calls.find((c) => c.init.method === "HEAD");
  assert.equal(head.url, "http://gochan.test/events?id=c1");
  const fresh = last();
  assert.notEqual(fresh, withId);
  assert.equal(fresh.query.get("id"), null);
  assert.deepEqual(fresh.query.getAll("topic"), ["a", "b"]);
  assert.equal(fresh.query.get("last_event_id"), "e-1");
  fresh.config("c2", ["a", "b"]);
  await gc.flush();
  assert.deepEqual(server.updates, []);
  const reconnect = events.find(([type]) => type === "reconnect")[1];
  assert.deepEqual(reconnect, { clientId: "c2", previousClientId: "c1", sameClient: false });
});

test("another error status backs off, then reopens as the same client", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  last().drop(0);
  server.headStatus = 503;
  last().drop(2);
  await tick(5);
  const count = streams().length;
  await tick(600); // first backoff: 250..500 ms
  assert.equal(streams().length, count + 1);
  assert.equal(last().query.get("id"), "c1");
});

test("a refused token (401 with a challenge) keeps the client and backs off", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  last().drop(0);
  server.headStatus = 401;
  server.headHeaders = { "WWW-Authenticate": 'Bearer realm="gochan"' };
  last().drop(2);
  await tick(5);
  const errors = events.filter(([type]) => type === "error").map(([, detail]) => detail);
  assert.deepEqual(
    errors.map((e) => [e.code, e.status]),
    [["unauthorized", 401]],
  );
  const count = streams().length;
  await tick(600); // first backoff: 250..500 ms
  assert.equal(streams().length, count + 1);
  assert.equal(last().query.get("id"), "c1"); // the same client, not a new one
  assert.equal(gc.clientId, "c1");
});

test("a token goes as a bearer with updates and publish()", async () => {
  let calls = 0;
  const gc = client({ token: async () => `t${++calls}` });
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  gc.subscribe("b", () => {});
  await gc.flush();
  const post = server.calls.find((c) => c.init.method === "POST");
  assert.equal(post.init.headers.Authorization, "Bearer t1");
  server.respond = (call) =>
    call.url.endsWith("/publish")
      ? new Response(JSON.stringify({ id: "e-9" }), { status: call.body.topic === "a" ? 200 : 403 })
      : null;
  assert.equal(await gc.publish("a", { n: 1 }), "e-9");
  const sent = server.calls[server.calls.length - 1];
  assert.equal(sent.url, "http://gochan.test/publish");
  assert.deepEqual(sent.body, { topic: "a", data: { n: 1 } });
  assert.equal(sent.init.headers.Authorization, `Bearer t${calls}`); // asked again
  assert.ok(calls >= 2);
  await assert.rejects(gc.publish("b", "x"), (error) => error.status === 403);
  await assert.rejects(gc.publish("message", "x"), TypeError);
});

test("publishMany() posts one JSON array and resolves to the ids", async () => {
  const gc = client({ token: "tok" });
  server.respond = (call) => {
    if (!call.url.endsWith("/publish")) return null;
    if (call.body.length === 3) {
      const failed = { ids: ["e-1"], error: "publish failed at message 1: broker down" };
      return new Response(JSON.stringify(failed), { status: 503 });
    }
    if (call.body.some((m) => m.topic === "forbidden")) {
      return new Response("message 1: not allowed to publish to 'forbidden'\n", { status: 403 });
    }
    const ids = call.body.map((_, n) => `e-${n + 1}`);
    return new Response(JSON.stringify({ ids }), { status: 200 });
  };
  const ids = await gc.publishMany([
    { topic: "a", data: "one" },
    { topic: "b", data: { n: 2 } },
  ]);
  assert.deepEqual(ids, ["e-1", "e-2"]);
  const sent = server.calls[server.calls.length - 1];
  assert.equal(sent.url, "http://gochan.test/publish");
  assert.equal(sent.init.headers["Content-Type"], "application/json");
  assert.equal(sent.init.headers.Authorization, "Bearer tok");
  assert.deepEqual(sent.body, [
    { topic: "a", data: "one" },
    { topic: "b", data: { n: 2 } },
  ]);
  await assert.rejects(
    gc.publishMany([{ topic: "a" }, { topic: "forbidden" }]),
    (error) => error.status === 403 && error.ids === undefined && /forbidden/.test(error.message),
  );
  await assert.rejects(
    gc.publishMany([{ topic: "a" }, { topic: "b" }, { topic: "c" }]),
    (error) => error.status === 503 && error.ids.length === 1 && /broker down/.test(error.message),
  );
  const before = server.calls.length;
  await assert.rejects(gc.publishMany([{ topic: "a" }, { topic: "message" }]), TypeError);
  assert.equal(server.calls.length, before); // refused before anything is sent
});

test("refused topics are reported once, not retried in a loop", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  server.respond = (call) => {
    if (call.init.method !== "POST") return null;
    const errors = [{ topic: "bad", code: "subscription-failure", message: "broker said no" }];
    const answer = { client_id: "c1", subscriptions: ["a", "ok"], errors };
    return new Response(JSON.stringify(answer), { status: 200 });
  };
  gc.subscribe("ok", () => {});
  gc.subscribe("bad", () => {});
  await gc.flush();
  await gc.flush();
  assert.equal(server.updates.length, 1);
  assert.deepEqual(
    events.filter(([t]) => t === "error").map(([, d]) => d),
    [{ topic: "bad", code: "subscription-failure", message: "broker said no" }],
  );
  // Subscribing again (after unsubscribing) is a new attempt.
  gc.unsubscribe("bad");
  gc.subscribe("bad", () => {});
  await gc.flush();
  assert.equal(server.updates.length, 2);
});

test("a refused update (4xx) is reported and not repeated; 5xx is retried", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  let status = 400;
  server.respond = (call) =>
    call.init.method === "POST" && status !== 200
      ? new Response("too many topics\n", { status })
      : null;
  gc.subscribe("b", () => {});
  await gc.flush();
  assert.equal(server.updates.length, 1);
  const refused = events.filter(([t]) => t === "error").map(([, d]) => d);
  assert.deepEqual(refused, [{ code: "update-failed", message: "too many topics", status: 400 }]);

  status = 503;
  gc.subscribe("c", () => {});
  await tick(50);
  assert.equal(server.updates.length, 2);
  status = 200;
  await gc.flush(); // the retry, about a second later
  assert.deepEqual(server.updates[2], { client_id: "c1", add: ["c"], remove: [] });
  assert.ok(gc.subscriptions.includes("c"));
});

test("Invalid Client ID on an open stream starts a new client", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  const first = last();
  first.config("c1", ["a"]);
  server.respond = (call) =>
    call.init.method === "POST" ? new Response("Invalid Client ID\n", { status: 400 }) : null;
  gc.subscribe("b", () => {});
  await tick(20);
  assert.ok(first.closed);
  assert.deepEqual(last().query.getAll("topic"), ["a", "b"]);
  assert.equal(last().query.get("id"), null);
  assert.equal(gc.clientId, null);
});

test("system frames become events; topics named like EventSource events are topics", async () => {
  const gc = client();
  const got = [];
  gc.subscribe("error", (data) => got.push(["error", data]));
  gc.subscribe("open", (data) => got.push(["open", data]));
  await tick();
  const es = last();
  es.config("c1", ["error", "open"]);
  es.frame("error", "a topic message", "e-1");
  es.frame("open", "", "e-2");
  const failure = { code: "subscription-failure", message: "down", topic: "open" };
  es.frame("message", JSON.stringify({ error: failure }));
  es.frame("message", JSON.stringify({ replay: { last_event_id: "e-0", recovered: false } }));
  es.frame("message", JSON.stringify({ something: "new" }));
  es.frame("message", "Client closed");
  assert.deepEqual(got, [
    ["error", "a topic message"],
    ["open", ""],
  ]);
  assert.deepEqual(events.slice(2), [
    ["error", failure],
    ["replay", { lastEventId: "e-0", recovered: false }],
    ["message", { data: '{"something":"new"}' }],
    ["closed", {}],
  ]);
  assert.equal(streams().length, 1); // a topic frame named "error" is not a failure
});

test("a throwing handler is reported and the others still run", async () => {
  const reported = [];
  globalThis.reportError = (error) => reported.push(error.message);
  const gc = client();
  const got = [];
  gc.subscribe("t", () => {
    throw new Error("boom");
  });
  gc.subscribe("t", (data) => got.push(data));
  await tick();
  last().config("c1", ["t"]);
  last().frame("t", "x", "e-1");
  assert.deepEqual(reported, ["boom"]);
  assert.deepEqual(got, ["x"]);
});

test("topics gochan would refuse are refused at once", () => {
  const gc = client();
  const refused = [
    "",
    "message",
    "a\nb",
    "nul\u0000",
    "c1\u0085",
    "x".repeat(257),
    "é".repeat(129),
    "\ud800",
    "a\udc00",
    7,
  ];
  for (const bad of refused) {
    assert.throws(() => gc.subscribe(bad, () => {}), TypeError, JSON.stringify(bad));
  }
  assert.equal(checkTopic("é".repeat(128)), "é".repeat(128)); // 256 bytes
  assert.equal(checkTopic("🎉 ☃ a/b?c"), "🎉 ☃ a/b?c");
  assert.throws(() => gc.subscribe("ok", "not a function"), TypeError);
  assert.deepEqual(gc.topics, []);
});

test("credentials, headers and query reach the right requests", async () => {
  const gc = client({
    withCredentials: true,
    headers: async () => ({ Authorization: "Bearer t0ken" }),
    query: { access_token: "q" },
    eventsPath: "/sse",
    updatePath: "/subs",
  });
  gc.subscribe("a", () => {});
  await tick();
  assert.deepEqual(last().init, { withCredentials: true });
  assert.equal(last().url, "http://gochan.test/sse?topic=a&access_token=q");
  last().config("c1", ["a"]);
  gc.subscribe("b", () => {});
  await gc.flush();
  const post = server.calls.find((c) => c.init.method === "POST");
  assert.equal(post.url, "http://gochan.test/subs?access_token=q");
  assert.equal(post.init.credentials, "include");
  assert.deepEqual(post.init.headers, {
    "Content-Type": "application/json",
    Authorization: "Bearer t0ken",
  });
});

test("topics beyond what fits in a URL follow in one update", async () => {
  const gc = client();
  const topics = Array.from({ length: 1000 }, (_, i) => `topic-number-${i}`);
  for (const t of topics) gc.subscribe(t, () => {});
  await tick();
  const inUrl = last().query.getAll("topic");
  assert.ok(inUrl.length > 100 && inUrl.length < 1000, String(inUrl.length));
  assert.ok(last().url.length < 6000);
  server.topics = new Set(inUrl);
  last().config("c1", inUrl);
  await gc.flush();
  assert.equal(server.updates.length, 1);
  assert.deepEqual(server.updates[0].add, topics.slice(inUrl.length));
});

test("close() stops everything; connect() resumes as the same client", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  const es = last();
  es.config("c1", ["a"]);
  gc.close();
  assert.ok(es.closed);
  assert.equal(gc.connected, false);
  gc.subscribe("b", () => {});
  await gc.flush(); // resolves while closed
  await tick(20);
  assert.equal(streams().length, 1);
  gc.connect();
  await tick();
  assert.equal(streams().length, 2);
  assert.equal(last().query.get("id"), "c1");
  server.topics = new Set(["a"]);
  last().config("c1", ["a"]);
  await gc.flush();
  assert.deepEqual(server.updates, [{ client_id: "c1", add: ["b"], remove: [] }]);
});

test("at a shutdown the first stream reopens as the same client after the server's delay", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  const first = last();
  first.config("c1", ["a"]);
  first.frame("a", "x", "e-7");
  await gc.flush();
  mock.timers.enable({ apis: ["setTimeout"] }); // the delay on a clock of the test's own
  first.shutdown(2500);
  assert.deepEqual(events.slice(-1), [["closed", { retryMs: 2500 }]]);
  assert.equal(kinds().includes("message"), false); // the shutdown frame is not a "message"
  first.drop(0);
  assert.ok(first.closed, "the browser does not reconnect it either");
  assert.equal(gc.connected, false);
  assert.deepEqual(events.slice(-1), [["disconnect", { clientId: "c1" }]]);
  gc.subscribe("b", () => {}); // a change while it waits does not open it early
  mock.timers.tick(0);
  mock.timers.tick(2499);
  assert.equal(streams().length, 1);
  mock.timers.tick(1);
  assert.equal(streams().length, 2);
  const second = last();
  assert.equal(second.query.get("id"), "c1");
  assert.equal(second.query.get("last_event_id"), "e-7");
  assert.equal(second.query.get("topic"), null);
  mock.timers.reset();
  server.topics = new Set(["a"]);
  second.config("c1", ["a"]);
  await gc.flush();
  assert.deepEqual(server.updates, [{ client_id: "c1", add: ["b"], remove: [] }]);
  const reconnect = events.find(([type]) => type === "reconnect")[1];
  assert.deepEqual(reconnect, { clientId: "c1", previousClientId: "c1", sameClient: true });
});

test("at a shutdown a stream that names the client also waits the server's delay", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  last().drop(0); // the first stream dropped: the next one names the client
  const named = last();
  named.config("c1", ["a"]);
  named.frame("a", "y", "e-9");
  mock.timers.enable({ apis: ["setTimeout"] });
  named.shutdown(700);
  named.drop(0);
  assert.ok(named.closed);
  mock.timers.tick(699);
  assert.equal(streams().length, 2);
  mock.timers.tick(1);
  assert.equal(streams().length, 3);
  assert.equal(last().query.get("id"), "c1");
  assert.equal(last().query.get("last_event_id"), "e-9");
});

test("close() while waiting out a shutdown delay cancels the reopening", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  last().config("c1", ["a"]);
  mock.timers.enable({ apis: ["setTimeout"] });
  last().shutdown(1000);
  last().drop(0);
  gc.close();
  mock.timers.tick(5000);
  assert.equal(streams().length, 1);
  gc.connect(); // a new start does not wait for the old delay
  mock.timers.tick(0);
  assert.equal(streams().length, 2);
  assert.equal(last().query.get("id"), "c1");
});

test("Client closed without a shutdown frame: the first stream reopens at once, as before", async () => {
  const gc = client();
  gc.subscribe("a", () => {});
  await tick();
  const first = last();
  first.config("c1", ["a"]);
  first.frame("message", "Client closed"); // the client was removed, or its token expired
  assert.deepEqual(events.slice(-1), [["closed", {}]]);
  first.drop(0);
  assert.equal(streams().length, 2);
  assert.equal(last().query.get("id"), "c1");
  // A shutdown frame of an earlier stream does not carry over to this one.
  const second = last();
  second.config("c1", ["a"]);
  second.frame("message", "Client closed");
  assert.deepEqual(events.slice(-1), [["closed", {}]]);
});
