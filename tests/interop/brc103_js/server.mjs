// The reference BRC-104 server: express 5 behind @bsv/auth-express-middleware 2.0.5.
//
//   node server.mjs [PRIVATE_KEY_HEX]        (or BRC103_KEY=...)
//
// Listens on 127.0.0.1, port 0, prints ONE line {"listening": URL, "identityKey": HEX} on stdout
// and serves until killed. Routes mirror `trustmesh brc103 serve`:
//   GET  /hello         -> {"hello": <client identity key>}
//   POST /echo          -> the JSON body, header x-bsv-echo: yes
//   POST /echo-text     -> the text/plain body, header x-bsv-echo: yes
//   POST /echo-bin      -> the application/octet-stream body, header x-bsv-echo: yes
//   GET  /status/:code  -> status <code>, body {"status": <code>}
//   GET  /empty         -> 204 without body (the TS AuthFetch client hangs on it; for other clients)
//   GET  /certs         -> {"certificates": [...]}: what the caller presented, fields decrypted
//
// Environment (all optional):
//   BRC103_REQUEST_CERTS  JSON {"certifiers": [hex...], "types": {"<b64 type>": ["field"...]}}:
//                         certificates requested from every client (middleware certificatesToRequest)
//   BRC103_CERTS          JSON array of MasterCertificate objects (subject = this server) used to
//                         answer clients' certificate requests
//   BRC103_LOG            middleware log level (debug|info|warn|error), written to stderr
//   BRC103_EXIT_ON_STDIN_EOF=1  exit when stdin closes (so a dead test runner leaves no server)

import http from 'node:http'
import { Console } from 'node:console'
import express from 'express'
import { createAuthMiddleware } from '@bsv/auth-express-middleware'
import { certificateWallet, fail, jsonFromEnv, printLine, revealReceived } from './lib.mjs'

const wallet = certificateWallet(process.argv[2] ?? process.env.BRC103_KEY, jsonFromEnv('BRC103_CERTS', []))
const certificatesToRequest = jsonFromEnv('BRC103_REQUEST_CERTS', undefined)
const logLevel = process.env.BRC103_LOG || undefined

// Certificates received per client identity key (promises of decrypted summaries).
const received = new Map()

const app = express()
// Body parsers MUST run before the auth middleware: it rebuilds the signed request payload from
// req.body (JSON re-serialised with JSON.stringify, text as is, Buffers as is), not from the raw
// bytes. Only exactly "application/json" / "text/plain" count (see the reference notes, f.2).
const limit = '1mb'
app.use(express.json({ limit }))
app.use(express.text({ limit }))
app.use(express.raw({ type: 'application/octet-stream', limit }))
app.use(createAuthMiddleware({
  wallet,
  certificatesToRequest,
  onCertificatesReceived: (sender, certs) => {
    const summaries = revealReceived(wallet, certs)
    summaries.catch(() => {}) // reported by GET /certs
    received.set(sender, summaries)
  },
  // The middleware logs with console.debug/info, i.e. to stdout; keep stdout for the one line.
  logger: logLevel ? new Console(process.stderr) : undefined,
  logLevel
}))

app.get('/hello', (req, res) => {
  res.json({ hello: req.auth.identityKey })
})

app.post('/echo', (req, res) => {
  res.set('x-bsv-echo', 'yes')
  res.json(req.body)
})

app.post('/echo-text', (req, res) => {
  res.set('x-bsv-echo', 'yes')
  res.send(typeof req.body === 'string' ? req.body : '')
})

app.post('/echo-bin', (req, res) => {
  res.set('x-bsv-echo', 'yes')
  res.send(Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0))
})

app.get('/status/:code', (req, res) => {
  const code = Number(req.params.code)
  // A body is always sent: an empty authenticated response hangs the TS client.
  if (Number.isInteger(code) && code >= 200 && code <= 599) res.status(code).json({ status: code })
  else res.status(400).json({ error: 'bad status code' })
})

app.get('/empty', (req, res) => {
  res.status(204).end()
})

app.get('/certs', async (req, res) => {
  const pending = received.get(req.auth.identityKey)
  try {
    res.json({ certificates: pending === undefined ? [] : await pending })
  } catch (e) {
    res.status(500).json({ error: String(e?.message ?? e) })
  }
})

const { publicKey: identityKey } = await wallet.getPublicKey({ identityKey: true })
const server = http.createServer(app)
server.on('error', e => fail(`server error: ${e.message}`, 1))
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address()
  printLine({ listening: `http://127.0.0.1:${port}`, identityKey })
})

if (process.env.BRC103_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0))
  process.stdin.resume()
}
