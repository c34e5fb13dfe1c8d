// Requests with the reference BRC-104 client (@bsv/sdk 2.1.0 AuthFetch over a ProtoWallet).
//
//   node fetch.mjs --key HEX [-X METHOD] [--headers JSON] [--body TEXT | --body-hex HEX]
//                  [--timeout-ms N] [--request-certs JSON] URL
//   node fetch.mjs --key HEX --batch [--timeout-ms N] [--request-certs JSON]  < requests.json
//
// --key may also come from BRC103_KEY. BRC103_CERTS (JSON array of MasterCertificate objects whose
// subject is this client) lets the client answer a server's certificate request. --request-certs
// {"certifiers": [...], "types": {...}} asks the server for certificates in the handshake.
//
// With a URL: one request; prints ONE line {"status", "headers", "body", "bodyHex",
// "certificatesReceived"} and exits 0.
// With --batch: stdin is a JSON array of {"url", "method"?, "headers"?, "body"? | "bodyHex"?};
// the requests run one after the other on ONE AuthFetch (one handshake per origin, then the
// session is reused); prints ONE line: a JSON array of results as above.
//
// "headers" are what AuthFetch's Response carries: only the server-signed x-bsv-* (not
// x-bsv-auth*) and authorization headers, plus a synthetic x-bsv-auth-identity-key (the
// server's authenticated key); never content-type. "body" is the body decoded as UTF-8 (lossy
// for binary bodies; use bodyHex). "certificatesReceived": certificates the server presented
// (fields decrypted), collected since the previous request.
//
// Failure: the error on stderr, exit 1; exit 3 on timeout (covers the whole batch). AuthFetch
// never settles when a response fails verification (e.g. any empty-bodied response from the
// express server), so the timeout is the only way such a request ends.

import { parseArgs } from 'node:util'
import { AuthFetch } from '@bsv/sdk'
import { certificateWallet, fail, jsonFromEnv, printLine, revealReceived } from './lib.mjs'

let args
try {
  args = parseArgs({
    allowPositionals: true,
    options: {
      key: { type: 'string' },
      method: { type: 'string', short: 'X', default: 'GET' },
      headers: { type: 'string', default: '{}' },
      body: { type: 'string' },
      'body-hex': { type: 'string' },
      batch: { type: 'boolean', default: false },
      'timeout-ms': { type: 'string', default: '15000' },
      'request-certs': { type: 'string' }
    }
  })
} catch (e) {
  fail(e.message)
}
const { values: opts, positionals } = args
if (positionals.length !== (opts.batch ? 0 : 1)) {
  fail('usage: node fetch.mjs --key HEX [options] URL | node fetch.mjs --key HEX --batch < JSON')
}
if (opts.body !== undefined && opts['body-hex'] !== undefined) fail('--body and --body-hex exclude each other')

const timeoutMs = Number(opts['timeout-ms'])
let current = 0 // index of the request in flight, for the timeout message
const timer = setTimeout(
  () => fail(`timeout: no response within ${timeoutMs} ms (request #${current})`, 3), timeoutMs)

let requests
try {
  requests = opts.batch
    ? JSON.parse(await readStdin())
    : [{ url: positionals[0], method: opts.method, headers: JSON.parse(opts.headers), body: opts.body, bodyHex: opts['body-hex'] }]
  const wallet = certificateWallet(opts.key ?? process.env.BRC103_KEY, jsonFromEnv('BRC103_CERTS', []))
  const requestCerts = opts['request-certs'] === undefined ? undefined : JSON.parse(opts['request-certs'])
  const client = new AuthFetch(wallet, requestCerts)

  const results = []
  for (const request of requests) {
    results.push(await send(client, wallet, request))
    current++
  }
  clearTimeout(timer)
  // exit right after writing: keep-alive sockets would otherwise hold the process open
  printLine(opts.batch ? results : results[0], () => process.exit(0))
} catch (e) {
  fail(`fetch failed (request #${current}): ${e?.stack ?? e}`, 1)
}

async function send (client, wallet, { url, method = 'GET', headers = {}, body, bodyHex }) {
  // undefined body = "no body" (AuthFetch then substitutes "{}" for JSON POST/PUT/PATCH/DELETE,
  // else nothing). Bytes go in as a Uint8Array, as an application would pass them -- but
  // AuthFetch 2.1.0 JSON.stringifies every non-string body ('{"0":0,"1":255,...}').
  if (bodyHex !== undefined) body = Uint8Array.from(Buffer.from(bodyHex, 'hex'))
  const response = await client.fetch(url, { method, headers, body })
  const bytes = Buffer.from(await response.arrayBuffer())
  return {
    status: response.status,
    headers: Object.fromEntries(response.headers.entries()),
    body: bytes.toString('utf8'),
    bodyHex: bytes.toString('hex'),
    certificatesReceived: await revealReceived(wallet, client.consumeReceivedCertificates())
  }
}

async function readStdin () {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}
