import assert from "node:assert/strict";
import { createHash, createHmac } from "node:crypto";
import { equalBytes, hmacSha256, sha256, toBase64 } from "../util/sha256.ts";

const hex = (b: Uint8Array) => [...b].map((x) => x.toString(16).padStart(2, "0")).join("");

Deno.test("sha256 matches the FIPS 180-4 examples", () => {
  assert.equal(hex(sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  assert.equal(hex(sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  assert.equal(
    hex(sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
    "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
  );
});

Deno.test("sha256 and HMAC-SHA256 match node:crypto at every length around the block edges", () => {
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) >>> 0) >>> 24;
  for (let n = 0; n < 300; n++) {
    const data = Uint8Array.from({ length: n }, random);
    assert.equal(hex(sha256(data)), createHash("sha256").update(data).digest("hex"), `length ${n}`);
    const key = Uint8Array.from({ length: (n * 7) % 150 }, random);
    assert.equal(
      hex(hmacSha256(key, data)),
      createHmac("sha256", key).update(data).digest("hex"),
      `length ${n}`,
    );
  }
  const text = "función ✓ — 🚀";
  assert.equal(toBase64(sha256(text)), createHash("sha256").update(text).digest("base64"));
  assert.equal(
    toBase64(hmacSha256("t", text), true),
    createHmac("sha256", "t").update(text).digest("base64url"),
  );
});

Deno.test("equalBytes compares length and every byte", () => {
  assert.equal(equalBytes(new Uint8Array([1, 2]), new Uint8Array([1, 2])), true);
  assert.equal(equalBytes(new Uint8Array([1, 2]), new Uint8Array([1, 3])), false);
  assert.equal(equalBytes(new Uint8Array([1, 2]), new Uint8Array([1, 2, 0])), false);
});
