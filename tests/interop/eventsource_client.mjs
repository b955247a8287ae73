// Connects with the `eventsource` npm package (a WHATWG EventSource for
// Node.js) and prints what it observes, one JSON object per line:
//   {"kind":"open"}, {"kind":"event","type","data","lastEventId"},
//   {"kind":"error","readyState"}, {"kind":"reopened","delayMs"} (the time
//   from losing the stream to the reconnection being open, which the
//   server's `retry:` field sets), and what comes next, until killed.
// Beware: this package's MessageEvent.lastEventId is the frame's own id (""
// for a frame without one), not the stream's last id as in browsers; it does
// keep the last id for the Last-Event-ID header of its reconnections.
//
//   node eventsource_client.mjs URL TYPE... (event types to listen to;
//   "message" is the default type, gochan's system frames)
import { EventSource } from "eventsource";

const [url, ...types] = process.argv.slice(2);
const print = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
process.stdout.on("error", () => process.exit(0)); // the reader went away

const es = new EventSource(url);
let lostAt = null;

es.addEventListener("open", () => {
  if (lostAt === null) {
    print({ kind: "open" });
    return;
  }
  print({ kind: "reopened", delayMs: performance.now() - lostAt });
});
es.addEventListener("error", () => {
  if (lostAt === null) lostAt = performance.now();
  print({ kind: "error", readyState: es.readyState });
});
for (const type of new Set(["message", ...types])) {
  es.addEventListener(type, (event) => {
    print({ kind: "event", type: event.type, data: event.data, lastEventId: event.lastEventId });
  });
}
// Never outlive the test.
setTimeout(() => {
  print({ kind: "timeout" });
  process.exit(2);
}, 25000).unref();
