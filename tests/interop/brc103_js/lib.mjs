// Shared helpers of the BRC-103 reference scripts (server.mjs, fetch.mjs, certs.mjs).
//
// Everything here uses @bsv/sdk 2.1.0 as published; nothing patches its behaviour.

import { MasterCertificate, PrivateKey, ProtoWallet, VerifiableCertificate } from '@bsv/sdk'

/** A ProtoWallet from a 32-byte private key in hex. */
export function protoWallet (privateKeyHex) {
  if (typeof privateKeyHex !== 'string' || !/^[0-9a-fA-F]{64}$/.test(privateKeyHex)) {
    throw new Error('a private key of 64 hex digits is required (argument or BRC103_KEY)')
  }
  return new ProtoWallet(PrivateKey.fromHex(privateKeyHex))
}

/**
 * A ProtoWallet that also holds master certificates, so that a Peer can answer certificate
 * requests. A bare ProtoWallet has no listCertificates: the TS Peer then crashes the process
 * (unhandled rejection) as soon as the other side requests certificates.
 *
 * `masterCertificates` are MasterCertificate JSON objects (with masterKeyring) whose subject is
 * this wallet; fields are revealed with MasterCertificate.createKeyringForVerifier, i.e. exactly
 * what a real wallet's proveCertificate does.
 */
export function certificateWallet (privateKeyHex, masterCertificates = []) {
  const wallet = protoWallet(privateKeyHex)
  wallet.listCertificates = async ({ certifiers, types }) => {
    const hits = masterCertificates.filter(c => certifiers.includes(c.certifier) && types.includes(c.type))
    return { totalCertificates: hits.length, certificates: hits.map(withoutKeyring) }
  }
  wallet.proveCertificate = async ({ certificate, fieldsToReveal, verifier }) => {
    const master = masterCertificates.find(c => c.serialNumber === certificate.serialNumber)
    if (master === undefined) throw new Error(`no master certificate ${certificate.serialNumber}`)
    const keyringForVerifier = await MasterCertificate.createKeyringForVerifier(
      wallet, master.certifier, verifier, master.fields, fieldsToReveal ?? [],
      master.masterKeyring, master.serialNumber
    )
    return { keyringForVerifier }
  }
  return wallet
}

/** The certificate's public part (what listCertificates returns): no keyrings. */
function withoutKeyring (c) {
  return {
    type: c.type,
    serialNumber: c.serialNumber,
    subject: c.subject,
    certifier: c.certifier,
    revocationOutpoint: c.revocationOutpoint,
    fields: c.fields,
    signature: c.signature
  }
}

/**
 * Decrypts certificates a Peer received (plain JSON objects as they came off the wire; the
 * Peer has already checked their signatures and that they decrypt) for reporting.
 */
export async function revealReceived (verifierWallet, certificates) {
  return await Promise.all(certificates.map(async c => {
    const vc = new VerifiableCertificate(c.type, c.serialNumber, c.subject, c.certifier,
      c.revocationOutpoint, c.fields, c.keyring, c.signature)
    return {
      type: c.type,
      serialNumber: c.serialNumber,
      subject: c.subject,
      certifier: c.certifier,
      fields: await vc.decryptFields(verifierWallet)
    }
  }))
}

/** Parses JSON from an environment variable, or returns `fallback` if it is unset/empty. */
export function jsonFromEnv (name, fallback) {
  const text = process.env[name]
  if (text === undefined || text === '') return fallback
  try {
    return JSON.parse(text)
  } catch (e) {
    fail(`${name} is not valid JSON: ${e.message}`)
  }
}

/** Writes one JSON line to stdout and calls `then` once it has been flushed. */
export function printLine (obj, then = () => {}) {
  process.stdout.write(JSON.stringify(obj) + '\n', then)
}

/** Reports an error on stderr and exits with status 2 (usage) or the given status. */
export function fail (message, status = 2) {
  process.stderr.write(`${message}\n`)
  process.exit(status)
}
