// llama.cpp (the prebuilt CPU build that node-llama-cpp ships) as an independent reader of desktune's GGUF files.
// Usage: node reader.mjs JOB.json  ->  one JSON object on stdout.
// JOB: {model, lora?: [paths], threads, contextSize, maxTokens,
//       prompts?: [text]   (already rendered by the chat template: tokenized here, answered greedily token by token),
//       chats?: [message]  (one user message each, through the chat template llama.cpp reads from the file)}
import {readFileSync} from "node:fs";
import {getLlama, JinjaTemplateChatWrapper, LlamaChatSession} from "node-llama-cpp";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: job.model});
const lora = job.lora?.length ? {adapters: job.lora.map((filePath) => ({filePath}))} : undefined;
const context = await model.createContext({threads: job.threads, contextSize: job.contextSize, lora});

// Greedy answer to a rendered prompt: its token ids, the generated ids, and whether an end-of-generation token
// (EOS or end of turn, as the file declares them) that ended it before maxTokens, or null.
async function answer(text) {
    const sequence = context.getSequence();
    try {
        const promptTokens = model.tokenize(text, true);
        const tokens = [];
        let stopped = null;  // the end-of-generation token that ended the answer
        for await (const token of sequence.evaluate(promptTokens, {temperature: 0, yieldEogToken: true})) {
            if (model.isEogToken(token)) {
                stopped = token;
                break;
            }
            tokens.push(token);
            if (tokens.length >= job.maxTokens) break;
        }
        return {promptTokens, tokens, text: model.detokenize(tokens), stopped};
    } finally {
        sequence.dispose();
    }
}

// What a llama.cpp chat front end does: the chat template read from the file (rendered by llama.cpp's side, not
// node-llama-cpp's look-alike wrappers), no system message of its own, then generation until it stops.
const template = model.fileInfo.metadata?.tokenizer?.chat_template;
async function chat(message) {
    const sequence = context.getSequence();
    try {
        const chatWrapper = new JinjaTemplateChatWrapper({template});
        const session = new LlamaChatSession({contextSequence: sequence, chatWrapper});
        session.setChatHistory([]);  // the session would put its default system prompt first
        const result = await session.promptWithMeta(message, {temperature: 0, maxTokens: job.maxTokens});
        return {text: result.responseText, stopReason: result.stopReason, wrapper: session.chatWrapper.wrapperName};
    } finally {
        sequence.dispose();
    }
}

const out = {answers: [], chats: []};
for (const text of job.prompts ?? []) out.answers.push(await answer(text));
for (const message of job.chats ?? []) out.chats.push(await chat(message));
await context.dispose();
await model.dispose();
process.stdout.write(JSON.stringify(out));
