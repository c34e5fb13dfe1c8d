// A reference BRC-103 Socket.IO server, built the way @bsv/authsocket 2.0.1's AuthSocketServer is:
// a socket.io 4.8 Server on a node:http server, one @bsv/sdk 2.1.0 Peer per connection whose
// transport emits and receives the Socket.IO event "authMessage", and application events carried
// in general messages as the UTF-8 of JSON.stringify({eventName, data}).
//
// Why not @bsv/authsocket itself: the package is not in the npm registry this project installs
// from (`npm view @bsv/authsocket` answers 404), so this script rebuilds its small wrapper
// (AuthSocketServer + SocketServerTransport, about 60 lines of logic) from the same parts. Each
// piece it mirrors is named below.
//
//   node socket_server.mjs [PRIVATE_KEY_HEX]        (or BRC103_KEY=...)
//
// Listens on 127.0.0.1, port 0, prints ONE line {"listening": URL, "identityKey": HEX} and serves
// until killed (or, with BRC103_EXIT_ON_STDIN_EOF=1, until stdin closes). Every authenticated event
// X with data D is answered with event "echo" {"eventName": X, "data": D, "from": <client key>},
// as `trustmesh brc103 serve` does; event "certs" is answered with event "certs"
// {"certificates": [...]}: the certificates this client presented, fields decrypted.
//
// Environment: BRC103_REQUEST_CERTS (JSON RequestedCertificateSet asked of every client),
// BRC103_CERTS (JSON array of MasterCertificate objects, subject = this server, to answer
// clients' requests), BRC103_EXIT_ON_STDIN_EOF=1.

import http from 'node:http'
import { Server as IoServer } from 'socket.io'
import { Peer } from '@bsv/sdk'
import { certificateWallet, fail, jsonFromEnv, printLine, revealReceived } from './lib.mjs'

const wallet = certificateWallet(process.argv[2] ?? process.env.BRC103_KEY, jsonFromEnv('BRC103_CERTS', []))
const requestedCertificates = jsonFromEnv('BRC103_REQUEST_CERTS', undefined)

// SocketServerTransport: AuthMessages are the Socket.IO event "authMessage", the message object
// its one argument.
class SocketServerTransport {
  constructor (socket) { this.socket = socket }
  async send (message) { this.socket.emit('authMessage', message) }
  async onData (callback) {
    this.socket.on('authMessage', async message => { await callback(message) })
  }
}

// AuthSocketServer / AuthSocket: the event payload inside a general message.
const encodeEvent = (eventName, data) => Array.from(Buffer.from(JSON.stringify({ eventName, data }), 'utf8'))
function decodeEvent (payload) {
  try {
    return JSON.parse(Buffer.from(payload).toString('utf8'))
  } catch {
    return { eventName: '_unknown', data: null }
  }
}

const httpServer = http.createServer()
const io = new IoServer(httpServer)
io.on('connection', socket => {
  // AuthSocketServer.handleNewConnection: a new Peer per connection.
  const peer = new Peer(wallet, new SocketServerTransport(socket), requestedCertificates)
  let identityKey // learnt from the first general message, as AuthSocket does
  const certificates = []
  peer.listenForCertificatesReceived((sender, certs) => { certificates.push(...certs) })
  peer.listenForGeneralMessages(async (sender, payload) => {
    identityKey ??= sender
    const { eventName, data } = decodeEvent(payload)
    try {
      if (eventName === 'certs') {
        const shown = await revealReceived(wallet, certificates)
        await peer.toPeer(encodeEvent('certs', { certificates: shown }), identityKey)
      } else {
        await peer.toPeer(encodeEvent('echo', { eventName, data, from: sender }), identityKey)
      }
    } catch (e) {
      process.stderr.write(`socket_server.mjs: answering ${eventName} failed: ${e?.stack ?? e}\n`)
    }
  })
})

const { publicKey: identityKey } = await wallet.getPublicKey({ identityKey: true })
httpServer.on('error', e => fail(`server error: ${e.message}`, 1))
httpServer.listen(0, '127.0.0.1', () => {
  const { port } = httpServer.address()
  printLine({ listening: `http://127.0.0.1:${port}`, identityKey })
})

if (process.env.BRC103_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0))
  process.stdin.resume()
}
