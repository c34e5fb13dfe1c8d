// The reference BRC-103 Socket.IO client: @bsv/authsocket-client 2.0.2 (socket.io-client 4.8)
// over a ProtoWallet of @bsv/sdk 2.1.0.
//
//   node socket_client.mjs --key HEX --event NAME [--data JSON] [--request-certs JSON]
//                          [--transports polling,websocket] [--timeout-ms N] URL
//
// --key may also come from BRC103_KEY; BRC103_CERTS (JSON array of MasterCertificate objects whose
// subject is this client) answers a server's certificate request. --request-certs
// {"certifiers": [...], "types": {...}} asks the server for certificates in the handshake.
// --transports defaults to socket.io-client's own (polling first, then an upgrade to WebSocket).
//
// Connects, emits ONE event (NAME, DATA) and waits for the server's answer: the event "echo" (what
// `trustmesh brc103 serve` sends back). Prints ONE line {"eventName", "data", "serverIdentityKey",
// "certificatesReceived"} and exits 0. "certificatesReceived": the certificates the server
// presented, fields decrypted (read through the client's Peer, a private member of the
// AuthSocketClient object: the package offers no other way to see them).
//
// Failure: the error on stderr, exit 1; exit 3 on timeout.

import { parseArgs } from 'node:util'
import { AuthSocketClient } from '@bsv/authsocket-client'
import { certificateWallet, fail, jsonFromEnv, printLine, revealReceived } from './lib.mjs'

let args
try {
  args = parseArgs({
    allowPositionals: true,
    options: {
      key: { type: 'string' },
      event: { type: 'string' },
      data: { type: 'string' },
      'request-certs': { type: 'string' },
      transports: { type: 'string' },
      'timeout-ms': { type: 'string', default: '15000' }
    }
  })
} catch (e) {
  fail(e.message)
}
const { values: opts, positionals } = args
if (positionals.length !== 1 || opts.event === undefined) {
  fail('usage: node socket_client.mjs --key HEX --event NAME [--data JSON] [options] URL')
}
const timeoutMs = Number(opts['timeout-ms'])
setTimeout(() => fail(`timeout: no answer within ${timeoutMs} ms`, 3), timeoutMs).unref()

try {
  const wallet = certificateWallet(opts.key ?? process.env.BRC103_KEY, jsonFromEnv('BRC103_CERTS', []))
  const requestedCertificates = opts['request-certs'] === undefined ? undefined : JSON.parse(opts['request-certs'])
  const managerOptions = { reconnection: false }
  if (opts.transports !== undefined) managerOptions.transports = opts.transports.split(',')
  const socket = AuthSocketClient(positionals[0], { wallet, requestedCertificates, managerOptions })
  const received = []
  socket.peer.listenForCertificatesReceived((sender, certificates) => { received.push(...certificates) })
  socket.on('disconnect', reason => fail(`disconnected: ${reason}`, 1))
  socket.on('echo', async data => {
    const certificatesReceived = await revealReceived(wallet, received)
    printLine({ eventName: 'echo', data, serverIdentityKey: socket.serverIdentityKey, certificatesReceived },
      () => process.exit(0))
  })
  socket.emit(opts.event, opts.data === undefined ? undefined : JSON.parse(opts.data))
} catch (e) {
  fail(`socket client failed: ${e?.stack ?? e}`, 1)
}
