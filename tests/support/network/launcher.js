'use strict'
// Runs one in-memory PLC directory and one or more reference PDSes on 127.0.0.1 for skyfill's tests.
//
//   node launcher.js '<json config>'   (written by tests/support/network/_network.py)
//
// Config: {plcPort, pdsPort, dataDir, adminPassword, jwtSecret, plcRotationKeyHex,
//          repoBackfillLimitMs, pdsEnv: {...extra @atproto/pds ServerEnvironment fields},
//          pdses: [{port, listenPort, dataDir, jwtSecret, plcRotationKeyHex}, ...]}
// Without `pdses`, one PDS from the top-level pdsPort/dataDir/jwtSecret/plcRotationKeyHex. With it,
// one PDS per entry, all on the one PLC, each with its own data, secrets and port. `port` is the
// port the PDS writes into DID documents (http://localhost:PORT); `listenPort` (optional, 0 = any
// free one) is where it really listens, when the caller serves `port` itself (a proxy in front).
// When every server listens, prints ONE JSON line on stdout: {"ready": true, "pds_url", ...,
// "pdses": [{pds_url, pds_public_url, pds_did, data_dir}, ...]} (the top-level pds_* name the first).
// Stops on SIGTERM, SIGINT, or when stdin closes (so a dead parent never leaves it running).
// Anything else goes to stderr; stdout carries only that line.

const http = require('node:http')

// Neither server takes a bind address: force every listen() onto loopback.
const LOOPBACK = '127.0.0.1'
// A PDS whose public port is served by someone else listens on its `listenPort` instead.
const listenPorts = new Map()
const originalListen = http.Server.prototype.listen
http.Server.prototype.listen = function listenOnLoopback(...args) {
  const first = args[0]
  if (first === undefined || typeof first === 'function') {
    args.unshift(0, LOOPBACK)
  } else if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    if (listenPorts.has(Number(first))) args[0] = listenPorts.get(Number(first))
    if (typeof args[1] === 'string') args[1] = LOOPBACK
    else args.splice(1, 0, LOOPBACK)
  } else if (first && typeof first === 'object' && ('port' in first || 'host' in first)) {
    args[0] = { ...first, host: LOOPBACK }
  }
  return originalListen.apply(this, args)
}

function fail(stage, err) {
  process.stderr.write(`launcher: ${stage} failed: ${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
}

async function main() {
  const cfg = JSON.parse(process.argv[2] || '{}')
  const plcLib = require('@did-plc/server')
  const { PDS, envToCfg, envToSecrets } = await import('@atproto/pds')

  const db = plcLib.Database.mock()
  // @did-plc/server 0.0.1's in-memory database answers /export with nothing (its exportOps is a
  // stub); the Postgres one pages every operation by createdAt. Serve the mock's own operations the
  // way the Postgres query does (ordered by createdAt, `createdAt > after`, at most `count`), so the
  // real /export route can be tested: everything else about the route is the package's.
  db.exportOps = async (count, after) => Object.values(db.contents).flat()
    .filter((op) => !after || op.createdAt > after)
    .sort((a, b) => a.createdAt - b.createdAt)
    .slice(0, count)
    .map((op) => ({ did: op.did, operation: op.operation, cid: op.cid.toString(), nullified: op.nullified,
                    createdAt: op.createdAt.toISOString() }))
  const plc = plcLib.PlcServer.create({ db, port: cfg.plcPort })
  const plcListener = await plc.start().catch((err) => fail('PLC start', err))
  const plcPort = plcListener.address().port
  const plcUrl = `http://${LOOPBACK}:${plcPort}`

  const specs = cfg.pdses || [{ port: cfg.pdsPort, dataDir: cfg.dataDir, jwtSecret: cfg.jwtSecret,
                                plcRotationKeyHex: cfg.plcRotationKeyHex }]
  const pdses = []
  for (const spec of specs) {
    if (spec.listenPort !== undefined && spec.listenPort !== null) listenPorts.set(spec.port, spec.listenPort)
    const env = {
      port: spec.port,
      // publicUrl becomes http://localhost:PORT (https for any other name). Every PDS keeps the
      // default service DID did:web:localhost: nothing here resolves it, and each PDS signs its
      // tokens with its own jwtSecret, so one PDS's sessions are never accepted by another.
      hostname: 'localhost',
      devMode: true,
      version: '0.0.0-skyfill-test',
      dataDirectory: spec.dataDir,
      blobstoreDiskLocation: `${spec.dataDir}/blobs`,
      didPlcUrl: plcUrl,
      serviceHandleDomains: ['.test'],
      inviteRequired: false,
      repoBackfillLimitMs: cfg.repoBackfillLimitMs,
      jwtSecret: spec.jwtSecret,
      adminPassword: cfg.adminPassword,
      plcRotationKeyK256PrivateKeyHex: spec.plcRotationKeyHex,
      ...(cfg.pdsEnv || {}),
    }
    const pds = await PDS.create(envToCfg(env), envToSecrets(env)).catch((err) => fail('PDS create', err))

    // *.test handles have no DNS: the PDS's handle resolver (used when it checks a handle that
    // is not in its own database) answers from the accounts of the network's PDSes, this one
    // first, as the owning PDS's /.well-known/atproto-did route would for that Host. Its
    // resolveHandle route still answers a .test handle from its own accounts only (the reference
    // PDS's rule for its service domain), and it hands out a handle after checking only its own
    // accounts, so tests keep handles unique across the network.
    const domains = pds.ctx.cfg.identity.serviceHandleDomains
    pds.ctx.idResolver.handle.resolve = async (handle) => {
      if (!domains.some((d) => handle.endsWith(d))) return undefined
      for (const owner of [pds, ...pdses.map((p) => p.pds).filter((p) => p !== pds)]) {
        const account = await owner.ctx.accountManager.getAccount(handle)
        if (account) return account.did
      }
      return undefined
    }

    const pdsListener = await pds.start().catch((err) => fail('PDS start', err))
    pdses.push({ pds, port: pdsListener.address().port, dataDir: spec.dataDir })
  }

  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    process.stderr.write(`launcher: stopping (${why})\n`)
    const timer = setTimeout(() => process.exit(0), 5000)
    timer.unref()
    try {
      for (const { pds } of pdses) await pds.destroy()
      await plc.destroy()
    } catch (err) {
      process.stderr.write(`launcher: shutdown error: ${err && err.stack ? err.stack : err}\n`)
    }
    process.exit(0)
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
  process.stdin.on('end', () => stop('stdin closed'))
  process.stdin.on('error', () => stop('stdin error'))
  process.stdin.resume()

  const described = pdses.map(({ pds, port, dataDir }) => ({
    pds_url: `http://${LOOPBACK}:${port}`,
    pds_public_url: pds.ctx.cfg.service.publicUrl,
    pds_did: pds.ctx.cfg.service.did,
    data_dir: dataDir,
  }))
  process.stdout.write(
    JSON.stringify({
      ready: true,
      ...described[0],
      pdses: described,
      plc_url: plcUrl,
      admin_password: cfg.adminPassword,
      node: process.version,
      pid: process.pid,
    }) + '\n',
  )
}

main().catch((err) => fail('launcher', err))
