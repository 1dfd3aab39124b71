// The benchmark peer: @atproto/sync's Firehose, the reference TypeScript consumer, on our relay.
//
//   node peer.mjs --service ws://127.0.0.1:P --plc URL --last-seq N [--verify] [--concurrency C]
//
// Subscribes from the first frame (no cursor), hands every event to a handler that only counts
// it, and stops when every frame up to seq N has been processed: the reference MemoryRunner
// reports its consecutive cursor through `setCursor`, the signal the library offers for "all
// work up to here is done". --concurrency: the runner's events in flight (default: its own,
// unbounded). Prints one JSON line: seconds, events by type (each counted once:
// a reconnect replays from the runner's cursor), replayed events, errors by reason.
//
// The PLC at --plc serves the DID documents: identity events fetch the DID's document in both
// modes. --verify: commits authenticated (signature + MST proofs via verifyProofs), keys from
// that PLC. Handles are not checked in either mode (`unauthenticatedHandles`): that needs DNS and
// HTTPS on each handle's own domain, which a closed benchmark cannot serve, and skyfill does not
// resolve handles either. The resolver gets `globalThis.fetch` because its default fetch is the
// SSRF-protected one, which refuses every IP-literal host (our PLC is on 127.0.0.1) with
// "Invalid hostname"; its DID documents are cached in the library's MemoryCache, as a real
// consumer would do (without a cache every commit costs a PLC round trip).
import { parseArgs } from 'node:util'
import { IdResolver, MemoryCache } from '@atproto/identity'
import { Firehose, MemoryRunner } from '@atproto/sync'

const { values: args } = parseArgs({
  options: {
    service: { type: 'string' },
    plc: { type: 'string' },
    'last-seq': { type: 'string' },
    verify: { type: 'boolean', default: false },
    concurrency: { type: 'string' },
    timeout: { type: 'string', default: '600' },
  },
})
if (!args.service || !args['last-seq'] || !args.plc) {
  console.error('usage: node peer.mjs --service WS --plc URL --last-seq N [--verify] [--concurrency C]')
  process.exit(2)
}
const lastSeq = Number(args['last-seq'])
const concurrency = args.concurrency === undefined ? Infinity : Number(args.concurrency)

const events = {}
const errors = {}
const seen = new Set()
let replayed = 0
let done
const finished = new Promise((resolve) => {
  done = resolve
})

// One reason per error: the error class, then the innermost cause's message.
const reason = (err) => {
  let inner = err
  while (inner?.cause instanceof Error) inner = inner.cause
  const name = err?.constructor?.name ?? 'Error'
  return inner === err ? `${name}: ${err?.message}` : `${name}: ${inner.constructor.name}: ${inner.message}`
}

const idResolver = new IdResolver({
  plcUrl: args.plc,
  // The default 3 s is per request; the MemoryRunner starts one resolution per first-seen DID at
  // once (1,000 in flight against one loopback PLC), and a timeout there would measure the
  // queueing of our test PLC, not the consumer: 30 s keeps every resolution, slow or not.
  timeout: 30_000,
  didCache: new MemoryCache(),
  fetch: globalThis.fetch,
})
const runner = new MemoryRunner({
  concurrency,
  setCursor: (cursor) => {
    if (cursor >= lastSeq) done()
  },
})
const firehose = new Firehose({
  service: args.service,
  idResolver,
  runner,
  unauthenticatedCommits: !args.verify,
  unauthenticatedHandles: true,
  subscriptionReconnectDelay: 100,
  handleEvent: (evt) => {
    // After a reconnect the runner resumes from its last consecutive seq, so events handled
    // past it arrive again: count each once, and the repeats apart.
    const key = evt.uri === undefined ? `${evt.seq} ${evt.event}` : `${evt.seq} ${evt.uri.toString()}`
    if (seen.has(key)) {
      replayed += 1
      return
    }
    seen.add(key)
    events[evt.event] = (events[evt.event] ?? 0) + 1
  },
  onError: (err) => {
    const key = reason(err)
    errors[key] = (errors[key] ?? 0) + 1
  },
})

const timer = setTimeout(() => {
  console.error(`peer: not done after ${args.timeout}s; events ${JSON.stringify(events)} errors ${JSON.stringify(errors)}`)
  process.exit(1)
}, Number(args.timeout) * 1000)
const started = process.hrtime.bigint()
const cpuStart = process.cpuUsage()
firehose.start()
await finished
const seconds = Number(process.hrtime.bigint() - started) / 1e9
const cpu = process.cpuUsage(cpuStart)
clearTimeout(timer)
await firehose.destroy()
await runner.destroy()
console.log(
  JSON.stringify({
    seconds,
    cpu_seconds: (cpu.user + cpu.system) / 1e6,
    verify: args.verify,
    concurrency: Number.isFinite(concurrency) ? concurrency : null,
    events,
    replayed,
    errors,
    peak_rss: process.resourceUsage().maxRSS * 1024,
    node: process.version,
  }),
)
process.exit(0)
