// Compiled (not run) by tsc against gochan/static/gochan.d.ts: the documented
// usage type-checks, and misuse does not.
import Gochan, {
  type ClosedDetail,
  type ConfigDetail,
  type ErrorDetail,
  type GochanOptions,
  type MessageHandler,
  Gochan as NamedGochan,
  checkTopic,
} from "../../gochan/static/gochan.js";

const options: GochanOptions = {
  eventsPath: "/events",
  updatePath: "/update_subscriptions",
  withCredentials: true,
  headers: async () => ({ Authorization: "Bearer t0ken" }),
  query: () => ({ access_token: "q" }),
  batchDelayMs: 5,
};
const gc: NamedGochan = new Gochan("https://push.example.com", options);
new Gochan();
new Gochan("", { headers: { Authorization: "Bearer x" }, EventSource, fetch });

const handler: MessageHandler = (data, { topic, id, event }) => {
  const text: string = `${data} ${topic} ${id} ${event.data} ${event.lastEventId}`;
  console.log(text);
};
const off: () => void = gc.subscribe("news", handler);
off();
gc.unsubscribe("news", handler);
gc.unsubscribe("news");

gc.addEventListener("config", (e) => {
  const detail: ConfigDetail = e.detail;
  const ttl: number = detail.clientTtlMillis;
  const topics: string[] = detail.subscriptions;
  console.log(detail.clientId, ttl, topics, detail.config.client_id);
});
gc.addEventListener("error", (e) => {
  const detail: ErrorDetail = e.detail;
  const topic: string | undefined = detail.topic;
  console.log(detail.code, detail.message, topic, detail.status);
});
gc.addEventListener("replay", (e) =>
  console.log(e.detail.lastEventId, e.detail.recovered === true),
);
gc.addEventListener("reconnect", (e) =>
  console.log(e.detail.sameClient, e.detail.previousClientId),
);
gc.addEventListener("disconnect", (e) => console.log(e.detail.clientId));
gc.addEventListener("open", (e) => console.log(e.detail.url));
gc.addEventListener("closed", (e) => {
  const detail: ClosedDetail = e.detail;
  const wait: number | undefined = detail.retryMs;
  console.log(wait === undefined ? "removed" : `back in ${wait} ms`);
});
gc.addEventListener("closed", () => gc.close());
gc.addEventListener("message", (e) => console.log(e.detail.data));
gc.addEventListener("custom-thing", (e: Event) => console.log(e.type));

const done: Promise<void> = gc.flush();
const id: string | null = gc.clientId;
const last: string = gc.lastEventId;
const live: boolean = gc.connected;
const wanted: string[] = gc.topics;
const held: string[] = gc.subscriptions;
console.log(done, id, last, live, wanted, held);
gc.connect().close();
const topic: string = checkTopic("news");
console.log(topic);

// Authorization: a bearer token (or a function giving one) for updates and publish().
new Gochan("", { token: "eyJ...", publishPath: "/publish" });
const withToken = new Gochan("", { token: async () => "eyJ...", withCredentials: true });
const published: Promise<string | null> = withToken.publish("news", { text: "hi" });
console.log(published);
const batch: Promise<(string | null)[]> = withToken.publishMany([
  { topic: "news", data: "one" },
  { topic: "sport", data: { score: 2 } },
]);
console.log(batch);
// @ts-expect-error: a message names its topic
withToken.publishMany([{ data: "x" }]);

// @ts-expect-error: data is a string
gc.subscribe("news", (data: number) => console.log(data));
// @ts-expect-error: no such option
new Gochan("", { batchDelay: 5 });
// @ts-expect-error: a token is a string
new Gochan("", { token: 42 });
// @ts-expect-error: read-only
gc.clientId = "forged";
// @ts-expect-error: retryMs may be absent (no shutdown frame)
gc.addEventListener("closed", (e) => console.log(e.detail.retryMs.toFixed()));
// @ts-expect-error: a config event's detail has no "code"
gc.addEventListener("config", (e) => console.log(e.detail.code));
