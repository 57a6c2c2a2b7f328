// every test uses libsodium: load it once per test file
import { ready } from "../src/index.js";

await ready();
