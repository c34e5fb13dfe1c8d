// BRC-52 certificate operations with the reference classes of @bsv/sdk 2.1.0.
//
//   echo '{"op": ...}' | node certs.mjs
//   node certs.mjs --lines
//
// Default: reads ONE JSON command on stdin, prints ONE JSON line with its result (exit 0);
// malformed commands and failures other than "certificate invalid" print the error on stderr
// and exit 1.
// --lines: a worker that saves Node's start-up (~0.35 s) per command: reads one JSON command per
// stdin line and answers each with one line {"result": ...} or {"error": "..."}, until EOF.
//
//   {"op":"issue", "certifierKey": hex, "subject": hex, "type": b64, "fields": {name: value},
//    "revocationOutpoint"?: "txid.index", "serialNumber"?: b64}
//     -> MasterCertificate JSON (type, serialNumber, subject, certifier, revocationOutpoint, fields,
//        signature, masterKeyring). Without revocationOutpoint the SDK uses "00"*32 WITHOUT an
//        output index (serialised as varint(NaN) = ff 00*8; see the reference notes d.2).
//   {"op":"reveal", "subjectKey": hex, "certificate": <master cert>, "fieldsToReveal": [...],
//    "verifier": hex}
//     -> VerifiableCertificate JSON (... signature, keyring) in the TS wire key order.
//   {"op":"verify", "certificate": <verifiable cert incl. keyring>, "verifierKey": hex}
//     -> {"valid": bool, "signatureValid": bool, "fields": {...} | null, "error"?: str}
//        valid = the certifier's signature verifies AND every keyring field decrypts.
//   {"op":"decrypt", "key": hex, "certificate": <master cert>, "counterparty": hex}
//     -> {"fields": {...}}: the subject (counterparty = certifier) or the certifier
//        (counterparty = subject) decrypts all fields through the master keyring.
//   {"op":"binary", "certificate": <cert>, "includeSignature"?: bool}
//     -> {"hex": Certificate.toBinary(...)}: the signed preimage (or full serialisation).

import { createInterface } from 'node:readline'
import { Certificate, MasterCertificate, Utils, VerifiableCertificate } from '@bsv/sdk'
import { printLine, protoWallet } from './lib.mjs'

const ops = {
  async issue (c) {
    const outpoint = c.revocationOutpoint
    return await MasterCertificate.issueCertificateForSubject(
      protoWallet(c.certifierKey), c.subject, c.fields, c.type,
      outpoint === undefined ? undefined : async () => outpoint,
      c.serialNumber
    )
  },

  async reveal (c) {
    const m = c.certificate
    const keyring = await MasterCertificate.createKeyringForVerifier(
      protoWallet(c.subjectKey), m.certifier, c.verifier, m.fields, c.fieldsToReveal,
      m.masterKeyring, m.serialNumber
    )
    return new VerifiableCertificate(m.type, m.serialNumber, m.subject, m.certifier,
      m.revocationOutpoint, m.fields, keyring, m.signature)
  },

  async verify (c) {
    const v = c.certificate
    const cert = new VerifiableCertificate(v.type, v.serialNumber, v.subject, v.certifier,
      v.revocationOutpoint, v.fields, v.keyring, v.signature)
    let signatureValid
    try {
      // verify() THROWS "Signature is not valid" rather than returning false.
      signatureValid = await cert.verify()
    } catch (e) {
      return { valid: false, signatureValid: false, fields: null, error: String(e?.message ?? e) }
    }
    if (!signatureValid) return { valid: false, signatureValid, fields: null }
    try {
      const fields = await cert.decryptFields(protoWallet(c.verifierKey))
      return { valid: true, signatureValid, fields }
    } catch (e) {
      return { valid: false, signatureValid, fields: null, error: String(e?.message ?? e) }
    }
  },

  async decrypt (c) {
    const m = c.certificate
    const fields = await MasterCertificate.decryptFields(
      protoWallet(c.key), m.masterKeyring, m.fields, c.counterparty)
    return { fields }
  },

  async binary (c) {
    const cert = Certificate.fromObject(c.certificate)
    return { hex: Utils.toHex(cert.toBinary(c.includeSignature ?? true)) }
  }
}

async function run (text) {
  const command = JSON.parse(text)
  const op = Object.hasOwn(ops, command?.op ?? '') ? ops[command.op] : undefined
  if (op === undefined) throw new Error(`unknown op ${JSON.stringify(command?.op)}`)
  return await op(command)
}

if (process.argv[2] === '--lines') {
  // Commands run one at a time, in order; answers are written in the same order.
  for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
    if (line.trim() === '') continue
    try {
      printLine({ result: await run(line) })
    } catch (e) {
      printLine({ error: String(e?.stack ?? e) })
    }
  }
} else {
  try {
    const chunks = []
    for await (const chunk of process.stdin) chunks.push(chunk)
    printLine(await run(Buffer.concat(chunks).toString('utf8')))
  } catch (e) {
    process.stderr.write(`certs.mjs: ${e?.stack ?? e}\n`)
    process.exitCode = 1
  }
}
