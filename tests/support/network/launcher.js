'use strict'
// Runs one in-memory PLC directory and one reference PDS on 127.0.0.1 for skyfill's tests.
//
//   node launcher.js '<json config>'   (written by tests/support/network/_network.py)
//
// Config: {plcPort, pdsPort, dataDir, adminPassword, jwtSecret, plcRotationKeyHex,
//          repoBackfillLimitMs, pdsEnv: {...extra @atproto/pds ServerEnvironment fields}}
// When both servers listen, prints ONE JSON line on stdout: {"ready": true, "pds_url", ...}.
// Stops on SIGTERM, SIGINT, or when stdin closes (so a dead parent never leaves it running).
// Anything else goes to stderr; stdout carries only that line.

const http = require('node:http')

// Neither server takes a bind address: force every listen() onto loopback.
const LOOPBACK = '127.0.0.1'
const originalListen = http.Server.prototype.listen
http.Server.prototype.listen = function listenOnLoopback(...args) {
  const first = args[0]
  if (first === undefined || typeof first === 'function') {
    args.unshift(0, LOOPBACK)
  } else if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
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

  const env = {
    port: cfg.pdsPort,
    hostname: 'localhost', // publicUrl becomes http://localhost:PORT (https for any other name)
    devMode: true,
    version: '0.0.0-skyfill-test',
    dataDirectory: cfg.dataDir,
    blobstoreDiskLocation: `${cfg.dataDir}/blobs`,
    didPlcUrl: plcUrl,
    serviceHandleDomains: ['.test'],
    inviteRequired: false,
    repoBackfillLimitMs: cfg.repoBackfillLimitMs,
    jwtSecret: cfg.jwtSecret,
    adminPassword: cfg.adminPassword,
    plcRotationKeyK256PrivateKeyHex: cfg.plcRotationKeyHex,
    ...(cfg.pdsEnv || {}),
  }
  const pds = await PDS.create(envToCfg(env), envToSecrets(env)).catch((err) => fail('PDS create', err))

  // *.test handles have no DNS: answer from the PDS's own accounts, exactly as its
  // /.well-known/atproto-did route would for that Host.
  const domains = pds.ctx.cfg.identity.serviceHandleDomains
  pds.ctx.idResolver.handle.resolve = async (handle) => {
    if (!domains.some((d) => handle.endsWith(d))) return undefined
    const account = await pds.ctx.accountManager.getAccount(handle)
    return account ? account.did : undefined
  }

  const pdsListener = await pds.start().catch((err) => fail('PDS start', err))
  const pdsPort = pdsListener.address().port

  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    process.stderr.write(`launcher: stopping (${why})\n`)
    const timer = setTimeout(() => process.exit(0), 5000)
    timer.unref()
    try {
      await pds.destroy()
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

  process.stdout.write(
    JSON.stringify({
      ready: true,
      pds_url: `http://${LOOPBACK}:${pdsPort}`,
      pds_public_url: pds.ctx.cfg.service.publicUrl,
      pds_did: pds.ctx.cfg.service.did,
      plc_url: plcUrl,
      admin_password: cfg.adminPassword,
      data_dir: cfg.dataDir,
      node: process.version,
      pid: process.pid,
    }) + '\n',
  )
}

main().catch((err) => fail('launcher', err))
